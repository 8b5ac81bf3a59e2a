"""dlmone.threads.ThreadGovernor: the thread count of a training loop, chosen by measured
step times (results are bitwise the same for any count, tested in test_model and
test_reliability, so switching never changes what a run computes)."""
import pytest

import dlmone
from dlmone.threads import ThreadGovernor


@pytest.fixture
def two_threads():
    before = dlmone.get_num_threads()
    dlmone.set_num_threads(2)
    yield
    dlmone.set_num_threads(before)


def drive(gov, cost, steps):
    """Feed the governor `steps` steps whose duration is cost[threads now]; the counts used."""
    used = []
    for _ in range(steps):
        used.append(gov.threads)
        gov.step(cost[gov.threads])
    return used


def test_keeps_all_threads_when_they_are_faster(two_threads):
    gov = ThreadGovernor(window=3, probe_every=20)
    used = drive(gov, {2: 1.0, 1: 1.8}, 100)
    assert used[0] == 2 and used[-1] == 2
    assert 0 < used.count(1) <= 20  # short probes of one thread, every probe_every steps
    gov.close()
    assert dlmone.get_num_threads() == 2


def test_falls_back_to_one_thread_next_to_a_busy_process(two_threads):
    gov = ThreadGovernor(window=3, probe_every=1000)
    drive(gov, {2: 1.0, 1: 1.8}, 10)           # quiet: 2 threads
    used = drive(gov, {2: 10.0, 1: 1.9}, 30)   # a busy neighbour: 2-thread steps collapse
    assert used[-1] == 1 and used[-20:].count(1) == 20  # it noticed at once (no probe_every wait)
    assert dlmone.get_num_threads() == 1
    used = drive(gov, {2: 1.0, 1: 1.8}, 3000)   # the neighbour left: back to 2 at the next probe
    assert used[-1] == 2
    gov.close()


def test_one_thread_machine_and_arguments(two_threads):
    gov = ThreadGovernor(max_threads=1)
    assert drive(gov, {1: 1.0}, 10) == [1] * 10
    gov.close()
    for bad in (dict(window=0), dict(probe_every=0), dict(slowdown=1.0), dict(margin=1.0)):
        with pytest.raises(ValueError):
            ThreadGovernor(**bad)


def test_teacher_run_with_and_without_the_governor_is_bitwise_the_same(tmp_path, two_threads):
    from dlmone.builtin_task import make_builtin_task
    from dlmone.data import Seq2SeqData
    from dlmone.teacher import TeacherConfig, train_teacher

    data = Seq2SeqData.from_pairs(**make_builtin_task(n_train=200, n_valid=16, n_test=4))
    params = []
    for adaptive in (True, False):
        cfg = TeacherConfig(steps=12, eval_every=12, save_every=12, eval_size=16, log_every=4,
                            adaptive_threads=adaptive)
        t = train_teacher(cfg, data, tmp_path / str(adaptive), progress=False, print_fn=lambda s: None)
        params.append(t.model.params.copy())
    assert (params[0] == params[1]).all()
    # a resumed run may change it: not one of the fields a resume must share
    assert "adaptive_threads" not in TeacherConfig(adaptive_threads=False).run_fields()
