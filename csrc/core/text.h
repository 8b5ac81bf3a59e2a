/* Text in and out of the network without per-token Python: BERT-uncased WordPiece
 * encoding of ASCII text and DiffuSeq's decoding of token ids (dlmone/tokenizer.py holds
 * the reference: HF tokenizers' BertNormalizer + BertPreTokenizer + WordPiece, and
 * Tokenizer.decode). Texts outside these paths (non-ASCII text, tokens that contain
 * whitespace) are left to the reference by the callers. */
#ifndef DLMONE_TEXT_H
#define DLMONE_TEXT_H

#include "common.h"

/* Longer words encode to a single [UNK] (tokenizer.MAX_CHARS_PER_WORD). */
#define WP_MAX_CHARS_PER_WORD 100

/* A vocabulary: token i is bytes[offsets[i] .. offsets[i+1]) (UTF-8), found by an
 * open-addressing hash table of ids (-1 = empty slot, table_size a power of two). */
typedef struct {
    size_t n_tokens;
    char *bytes;
    size_t *offsets;
    int32_t *table;
    size_t table_size;
    int32_t unk_id;
    /* ids of the special tokens matched verbatim in raw text, before normalisation */
    int32_t *special_ids;
    size_t n_special;
} WordPieceVocab;

/* Copies the tokens; 0, or -1 when out of memory (v is then freed). */
int wp_vocab_init(WordPieceVocab *v, const char *bytes, const size_t *offsets, size_t n_tokens,
                  int32_t unk_id, const int32_t *special_ids, size_t n_special);
void wp_vocab_free(WordPieceVocab *v);
/* The id of the token prefix + s (prefix_len + n bytes), or -1. */
int32_t wp_lookup(const WordPieceVocab *v, const char *prefix, size_t prefix_len, const char *s, size_t n);

/* Token ids of the ASCII text[0..n) (no [CLS]/[SEP]) into ids, which has room for n:
 * every id consumes at least one character. scratch holds n bytes. Returns the count. */
size_t wp_encode_ascii(const WordPieceVocab *v, const char *text, size_t n, int32_t *ids, char *scratch);

/* Tokenizer.decode of n tokens (all of them free of whitespace) into out, which has
 * room for the joined text: sum of the token lengths + n. Returns the text's length. */
size_t wp_decode(const WordPieceVocab *v, const int64_t *ids, size_t n, char *out);

#endif
