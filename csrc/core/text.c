/* BERT-uncased WordPiece encoding of ASCII text and DiffuSeq's decoding (text.h). */
#include "text.h"

static const char CONTINUATION_PREFIX[] = "##";

/* FNV-1a over prefix then s: the hash of their concatenation. */
static uint64_t hash_bytes(const char *prefix, size_t prefix_len, const char *s, size_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < prefix_len; i++) h = (h ^ (uint8_t)prefix[i]) * 0x100000001b3ULL;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 0x100000001b3ULL;
    return h;
}

void wp_vocab_free(WordPieceVocab *v) {
    free(v->bytes);
    free(v->offsets);
    free(v->table);
    free(v->special_ids);
    memset(v, 0, sizeof *v);
}

int wp_vocab_init(WordPieceVocab *v, const char *bytes, const size_t *offsets, size_t n_tokens,
                  int32_t unk_id, const int32_t *special_ids, size_t n_special) {
    memset(v, 0, sizeof *v);
    size_t table_size = 16;
    while (table_size < 2 * n_tokens) table_size *= 2;  /* load factor <= 1/2 */
    size_t n_bytes = offsets[n_tokens];
    v->bytes = malloc(n_bytes ? n_bytes : 1);
    v->offsets = malloc((n_tokens + 1) * sizeof *v->offsets);
    v->table = malloc(table_size * sizeof *v->table);
    v->special_ids = malloc((n_special ? n_special : 1) * sizeof *v->special_ids);
    if (!v->bytes || !v->offsets || !v->table || !v->special_ids) {
        wp_vocab_free(v);
        return -1;
    }
    memcpy(v->bytes, bytes, n_bytes);
    memcpy(v->offsets, offsets, (n_tokens + 1) * sizeof *v->offsets);
    memcpy(v->special_ids, special_ids, n_special * sizeof *v->special_ids);
    v->n_tokens = n_tokens;
    v->n_special = n_special;
    v->unk_id = unk_id;
    v->table_size = table_size;
    for (size_t i = 0; i < table_size; i++) v->table[i] = -1;
    for (size_t id = 0; id < n_tokens; id++) {
        const char *s = bytes + offsets[id];
        size_t slot = (size_t)hash_bytes(NULL, 0, s, offsets[id + 1] - offsets[id]) & (table_size - 1);
        while (v->table[slot] >= 0) slot = (slot + 1) & (table_size - 1);
        v->table[slot] = (int32_t)id;
    }
    return 0;
}

int32_t wp_lookup(const WordPieceVocab *v, const char *prefix, size_t prefix_len, const char *s, size_t n) {
    size_t slot = (size_t)hash_bytes(prefix, prefix_len, s, n) & (v->table_size - 1);
    for (int32_t id; (id = v->table[slot]) >= 0; slot = (slot + 1) & (v->table_size - 1)) {
        const char *token = v->bytes + v->offsets[id];
        if (v->offsets[id + 1] - v->offsets[id] == prefix_len + n && !memcmp(token, prefix, prefix_len) &&
            !memcmp(token + prefix_len, s, n))
            return id;
    }
    return -1;
}

/* ---------------------------------------------------------------- encoding */

/* Rust's char::is_ascii_punctuation, which BertPreTokenizer isolates. */
static int is_ascii_punct(unsigned char c) {
    return (c >= 0x21 && c <= 0x2f) || (c >= 0x3a && c <= 0x40) || (c >= 0x5b && c <= 0x60) ||
           (c >= 0x7b && c <= 0x7e);
}

/* Greedy longest-match WordPiece of one word; the ids go to ids, their count is returned. */
static size_t wordpiece(const WordPieceVocab *v, const char *word, size_t n, int32_t *ids) {
    if (n > WP_MAX_CHARS_PER_WORD) {
        ids[0] = v->unk_id;
        return 1;
    }
    size_t count = 0;
    for (size_t start = 0; start < n;) {
        size_t prefix_len = start ? sizeof CONTINUATION_PREFIX - 1 : 0;
        int32_t id = -1;
        size_t end = n;
        for (; end > start; end--)
            if ((id = wp_lookup(v, CONTINUATION_PREFIX, prefix_len, word + start, end - start)) >= 0) break;
        if (id < 0) {  /* a piece matches nothing: the whole word is [UNK] */
            ids[0] = v->unk_id;
            return 1;
        }
        ids[count++] = id;
        start = end;
    }
    return count;
}

/* BertNormalizer (clean_text, lowercase; the rest is the identity on ASCII), then
 * BertPreTokenizer and WordPiece, on a text holding no special token. */
static size_t encode_plain(const WordPieceVocab *v, const char *text, size_t n, int32_t *ids, char *scratch) {
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)text[i];
        if (c == '\t' || c == '\n' || c == '\r')
            scratch[len++] = ' ';
        else if (c < 0x20 || c == 0x7f)  /* other control characters are removed */
            continue;
        else
            scratch[len++] = (c >= 'A' && c <= 'Z') ? (char)(c + ('a' - 'A')) : (char)c;
    }
    size_t count = 0;
    for (size_t i = 0; i < len;) {
        if (scratch[i] == ' ') {
            i++;
        } else if (is_ascii_punct((unsigned char)scratch[i])) {
            count += wordpiece(v, scratch + i, 1, ids + count);
            i++;
        } else {
            size_t end = i;
            while (end < len && scratch[end] != ' ' && !is_ascii_punct((unsigned char)scratch[end])) end++;
            count += wordpiece(v, scratch + i, end - i, ids + count);
            i = end;
        }
    }
    return count;
}

size_t wp_encode_ascii(const WordPieceVocab *v, const char *text, size_t n, int32_t *ids, char *scratch) {
    /* Special tokens match in the raw text, leftmost first and then longest (HF's added
     * vocabulary); the text between them is normalised and encoded on its own. */
    size_t count = 0, segment = 0;
    for (size_t i = 0; i < n;) {
        size_t matched = 0;
        int32_t special = -1;
        for (size_t k = 0; k < v->n_special; k++) {
            int32_t id = v->special_ids[k];
            size_t len = v->offsets[id + 1] - v->offsets[id];
            if (len > matched && len <= n - i && !memcmp(text + i, v->bytes + v->offsets[id], len)) {
                matched = len;
                special = id;
            }
        }
        if (!matched) {
            i++;
            continue;
        }
        count += encode_plain(v, text + segment, i - segment, ids + count, scratch);
        ids[count++] = special;
        i += matched;
        segment = i;
    }
    return count + encode_plain(v, text + segment, n - segment, ids + count, scratch);
}

/* ---------------------------------------------------------------- decoding */

/* text.replace(pattern, replacement) in place, for a replacement no longer than the
 * pattern (of 2 bytes or more): Python's left-to-right, non-overlapping matches. The
 * search runs on the pattern's second byte, as most of them begin with a space. Returns
 * the new length. */
static size_t replace_shorter(char *text, size_t n, const char *pattern, size_t plen, const char *replacement,
                              size_t rlen) {
    size_t out = 0, done = 0;  /* text[0..done) is settled into text[0..out) */
    for (size_t k = 1; k < n;) {
        const char *second = memchr(text + k, pattern[1], n - k);
        if (!second) break;
        size_t start = (size_t)(second - text) - 1;
        if (start >= done && plen <= n - start && !memcmp(text + start, pattern, plen)) {
            memmove(text + out, text + done, start - done);
            out += start - done;
            memcpy(text + out, replacement, rlen);  /* out + rlen <= start + plen: no overlap */
            out += rlen;
            done = start + plen;
            k = done + 1;
        } else {
            k = start + 2;
        }
    }
    memmove(text + out, text + done, n - done);
    return out + n - done;
}

/* Tokenizer.decode's replacements, in its order: "##" glued, clean_up_tokenization,
 * then the structural tokens deleted. */
#define REPLACEMENT(pattern, replacement) {pattern, sizeof pattern - 1, replacement, sizeof replacement - 1}
static const struct {
    const char *pattern;
    size_t pattern_len;
    const char *replacement;
    size_t replacement_len;
} DECODE_REPLACEMENTS[] = {
    REPLACEMENT(" ##", ""),     REPLACEMENT(" .", "."),     REPLACEMENT(" ?", "?"),     REPLACEMENT(" !", "!"),
    REPLACEMENT(" ,", ","),     REPLACEMENT(" ' ", "'"),    REPLACEMENT(" n't", "n't"), REPLACEMENT(" 'm", "'m"),
    REPLACEMENT(" 's", "'s"),   REPLACEMENT(" 've", "'ve"), REPLACEMENT(" 're", "'re"), REPLACEMENT("[CLS]", ""),
    REPLACEMENT("[SEP]", ""),   REPLACEMENT("[PAD]", ""),
};

size_t wp_decode(const WordPieceVocab *v, const int64_t *ids, size_t n, char *out) {
    size_t len = 0;
    for (size_t i = 0; i < n; i++) {
        size_t token_len = v->offsets[ids[i] + 1] - v->offsets[ids[i]];
        if (i) out[len++] = ' ';
        memcpy(out + len, v->bytes + v->offsets[ids[i]], token_len);
        len += token_len;
    }
    /* The tokens hold no whitespace, so spaces are the only whitespace from here on and
     * Python's strip() after the "##" gluing has nothing to strip (the text begins and
     * ends with a token's character, and gluing deletes a space with what follows it). */
    for (size_t r = 0; r < sizeof DECODE_REPLACEMENTS / sizeof DECODE_REPLACEMENTS[0]; r++)
        len = replace_shorter(out, len, DECODE_REPLACEMENTS[r].pattern, DECODE_REPLACEMENTS[r].pattern_len,
                              DECODE_REPLACEMENTS[r].replacement, DECODE_REPLACEMENTS[r].replacement_len);
    /* " ".join(text.split()) */
    size_t kept = 0;
    for (size_t i = 0; i < len; i++) {
        if (out[i] == ' ' && (kept == 0 || out[kept - 1] == ' ')) continue;
        out[kept++] = out[i];
    }
    if (kept && out[kept - 1] == ' ') kept--;
    return kept;
}
