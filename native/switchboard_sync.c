/*
 * switchboard_sync: one bucket of a segment sync, in C.
 *
 * The reference is core/sync/engine.py with mapping.py and state.py: for every row of a
 * bucket's work blob it takes the raw digest, checks the identity, skips rows the
 * destination already has, types the mapped fields, applies suppression and consent,
 * diffs against the acknowledged state and encodes the /users/track object; after the
 * destination acknowledged a batch, it records the change in the bucket's state and
 * writes the state's lines. The results are the same bytes as the reference's, several
 * times faster: the tests run both on the same inputs and compare objects, state, counts
 * and rejects.
 *
 * C accepts only the common, plainly valid forms of each value. Anything else (a value it
 * does not recognise, a rejected value, non-ASCII text where case matters) is typed by the
 * reference's own coercer, called from here, so an unusual value costs a Python call and
 * never a different answer. Input this module does not take at all (non-text values,
 * state lines it cannot read) makes `process` return None, and the bucket runs on the
 * reference from the start.
 */
#include "shared.h"

#include <sys/mman.h>
#ifdef __GLIBC__
#include <malloc.h>
#endif

#define OK 0
#define ERR -1    /* a Python exception is set */
#define PUNT 1    /* not for this module: the bucket goes to the reference */
#define SLOW 2    /* this value goes to the reference's coercer */
#define NULLED 3  /* the coercer read the value as none (gender "unknown") */

#define TRY(expr)                    \
    do {                             \
        int try_status_ = (expr);    \
        if (try_status_ != OK) return try_status_; \
    } while (0)

typedef unsigned char uc;

/* Out of memory: an exception if this thread holds the GIL; else the caller sets it once
 * it holds the GIL again (an ERR with no exception set means exactly this). */
static void no_memory(void) {
    if (PyGILState_Check()) PyErr_NoMemory();
}


static uint64_t read64(const unsigned char *p) { /* little-endian, on any host */
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

/* ---- BLAKE2b (RFC 7693), the digest sizes hashlib.blake2b(digest_size=n) gives ---------- */

typedef struct {
    uint64_t h[8];
    uint64_t t;
    uc buf[128];
    size_t used;
    size_t outlen;
} Blake2b;

static const uint64_t B2_IV[8] = {0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL,
                                  0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
                                  0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL,
                                  0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
static const uint8_t B2_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4},
    {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13},
    {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11},
    {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5},
    {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

#define ROTR64(x, n) (((x) >> (n)) | ((x) << (64 - (n))))
#define B2_G(a, b, c, d, x, y)       \
    do {                             \
        a = a + b + x;               \
        d = ROTR64(d ^ a, 32);       \
        c = c + d;                   \
        b = ROTR64(b ^ c, 24);       \
        a = a + b + y;               \
        d = ROTR64(d ^ a, 16);       \
        c = c + d;                   \
        b = ROTR64(b ^ c, 63);       \
    } while (0)

static void b2_compress(Blake2b *s, const uc *block, int last) {
    uint64_t m[16], v[16];
    for (int i = 0; i < 16; i++) m[i] = read64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = s->h[i];
        v[i + 8] = B2_IV[i];
    }
    v[12] ^= s->t;
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *z = B2_SIGMA[r];
        B2_G(v[0], v[4], v[8], v[12], m[z[0]], m[z[1]]);
        B2_G(v[1], v[5], v[9], v[13], m[z[2]], m[z[3]]);
        B2_G(v[2], v[6], v[10], v[14], m[z[4]], m[z[5]]);
        B2_G(v[3], v[7], v[11], v[15], m[z[6]], m[z[7]]);
        B2_G(v[0], v[5], v[10], v[15], m[z[8]], m[z[9]]);
        B2_G(v[1], v[6], v[11], v[12], m[z[10]], m[z[11]]);
        B2_G(v[2], v[7], v[8], v[13], m[z[12]], m[z[13]]);
        B2_G(v[3], v[4], v[9], v[14], m[z[14]], m[z[15]]);
    }
    for (int i = 0; i < 8; i++) s->h[i] ^= v[i] ^ v[i + 8];
}

static void b2_init(Blake2b *s, size_t outlen) {
    memcpy(s->h, B2_IV, sizeof B2_IV);
    s->h[0] ^= 0x01010000ULL ^ outlen;
    s->t = 0;
    s->used = 0;
    s->outlen = outlen;
}

static void b2_update(Blake2b *s, const uc *p, size_t n) {
    while (n > 0) {
        if (s->used == 128) { /* only now: the last block is compressed by b2_final */
            s->t += 128;
            b2_compress(s, s->buf, 0);
            s->used = 0;
        }
        size_t take = 128 - s->used < n ? 128 - s->used : n;
        memcpy(s->buf + s->used, p, take);
        s->used += take;
        p += take;
        n -= take;
    }
}

static void b2_final(Blake2b *s, uc *out) {
    s->t += s->used;
    memset(s->buf + s->used, 0, 128 - s->used);
    b2_compress(s, s->buf, 1);
    for (size_t i = 0; i < s->outlen; i++) out[i] = (uc)(s->h[i / 8] >> (8 * (i % 8)));
}

/* 8-byte BLAKE2b of `prefix` then `p`: split.bucket_of and state.raw_digest. */
static void hash8(const char *prefix, size_t prefix_len, const uc *p, size_t n, uc out[8]) {
    Blake2b s;
    b2_init(&s, 8);
    b2_update(&s, (const uc *)prefix, prefix_len);
    b2_update(&s, p, n);
    b2_final(&s, out);
}

/* ---- XXH64 (seed 0), state.value_hash: the digest as xxhash.xxh64_digest gives it ----- */

#define XP1 0x9E3779B185EBCA87ULL
#define XP2 0xC2B2AE3D27D4EB4FULL
#define XP3 0x165667B19E3779F9ULL
#define XP4 0x85EBCA77C2B2AE63ULL
#define XP5 0x27D4EB2F165667C5ULL
#define ROTL64(x, n) (((x) << (n)) | ((x) >> (64 - (n))))

static uint64_t read32(const uc *p) { return (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16 | (uint64_t)p[3] << 24; }

static uint64_t xxh_round(uint64_t acc, uint64_t input) {
    acc += input * XP2;
    acc = ROTL64(acc, 31);
    return acc * XP1;
}

static uint64_t xxh_merge(uint64_t acc, uint64_t value) {
    acc ^= xxh_round(0, value);
    return acc * XP1 + XP4;
}

static uint64_t xxh64_seeded(const uc *p, size_t n, uint64_t seed) {
    const uc *end = p + n;
    uint64_t h;
    if (n >= 32) {
        uint64_t v1 = seed + XP1 + XP2, v2 = seed + XP2, v3 = seed, v4 = seed - XP1;
        const uc *limit = end - 32;
        do {
            v1 = xxh_round(v1, read64(p));
            v2 = xxh_round(v2, read64(p + 8));
            v3 = xxh_round(v3, read64(p + 16));
            v4 = xxh_round(v4, read64(p + 24));
            p += 32;
        } while (p <= limit);
        h = ROTL64(v1, 1) + ROTL64(v2, 7) + ROTL64(v3, 12) + ROTL64(v4, 18);
        h = xxh_merge(h, v1);
        h = xxh_merge(h, v2);
        h = xxh_merge(h, v3);
        h = xxh_merge(h, v4);
    } else {
        h = seed + XP5;
    }
    h += (uint64_t)n;
    while (p + 8 <= end) {
        h ^= xxh_round(0, read64(p));
        h = ROTL64(h, 27) * XP1 + XP4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= read32(p) * XP1;
        h = ROTL64(h, 23) * XP2 + XP3;
        p += 4;
    }
    while (p < end) {
        h ^= (*p++) * XP5;
        h = ROTL64(h, 11) * XP1;
    }
    h ^= h >> 33;
    h *= XP2;
    h ^= h >> 29;
    h *= XP3;
    h ^= h >> 32;
    return h;
}

static uint64_t xxh64(const uc *p, size_t n) { return xxh64_seeded(p, n, 0); }

/* state.value_hash: XXH64 of `prefix` then `p`, big-endian (xxhash's canonical form). */
/* state.raw_digest: XXH64 of the raw values' JSON list, big-endian. */
static void raw_digest8(const uc *p, size_t n, uc out[8]) {
    uint64_t h = xxh64(p, n);
    for (int i = 0; i < 8; i++) out[i] = (uc)(h >> (56 - 8 * i));
}

static int value_hash8(const char *prefix, size_t prefix_len, const uc *p, size_t n, uc out[8]) {
    uc small[512];
    uc *text = prefix_len + n <= sizeof small ? small : PyMem_RawMalloc(prefix_len + n);
    if (text == NULL) {
        no_memory();
        return -1;
    }
    memcpy(text, prefix, prefix_len);
    if (n) memcpy(text + prefix_len, p, n);
    uint64_t h = xxh64(text, prefix_len + n);
    if (text != small) PyMem_RawFree(text);
    for (int i = 0; i < 8; i++) out[i] = (uc)(h >> (56 - 8 * i));
    return 0;
}

/* ---- text: UTF-8 code points, Python's whitespace ------------------------------------- */

static unsigned decode_cp(const uc *p, const uc *end, int *len) {
    uc c = p[0];
    if (c < 0x80) {
        *len = 1;
        return c;
    }
    if (c < 0xE0 && p + 1 < end) {
        *len = 2;
        return (unsigned)(c & 0x1F) << 6 | (p[1] & 0x3F);
    }
    if (c < 0xF0 && p + 2 < end) {
        *len = 3;
        return (unsigned)(c & 0x0F) << 12 | (unsigned)(p[1] & 0x3F) << 6 | (p[2] & 0x3F);
    }
    if (p + 3 < end) {
        *len = 4;
        return (unsigned)(c & 0x07) << 18 | (unsigned)(p[1] & 0x3F) << 12 |
               (unsigned)(p[2] & 0x3F) << 6 | (p[3] & 0x3F);
    }
    *len = 1;
    return 0xFFFD;
}

/* str.isspace() for one code point. */
static int is_uspace(unsigned cp) {
    if (cp < 0x80) return cp == ' ' || (cp >= '\t' && cp <= '\r') || (cp >= 0x1C && cp <= 0x1F);
    return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
           cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

/* str.strip(): the span without leading and trailing whitespace. */
static void strip(const uc *s, Py_ssize_t n, Py_ssize_t *a, Py_ssize_t *b) {
    Py_ssize_t i = 0, j = n;
    while (i < j) {
        int len;
        unsigned cp = decode_cp(s + i, s + j, &len);
        if (!is_uspace(cp)) break;
        i += len;
    }
    while (j > i) {
        Py_ssize_t k = j - 1;
        while (k > i && (s[k] & 0xC0) == 0x80) k--;
        int len;
        if (!is_uspace(decode_cp(s + k, s + j, &len))) break;
        j = k;
    }
    *a = i;
    *b = j;
}

static Py_ssize_t code_points(const uc *s, Py_ssize_t n) {
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < n; i++) count += (s[i] & 0xC0) != 0x80;
    return count;
}

static int is_ascii(const uc *s, Py_ssize_t n) {
    for (Py_ssize_t i = 0; i < n; i++)
        if (s[i] >= 0x80) return 0;
    return 1;
}

/* mapping._MOJIBAKE_PAIR: only where it matches can text be mojibake. */
static int continuation_like(unsigned cp) {
    return (cp >= 0x80 && cp <= 0xBF) || (cp >= 0x152 && cp <= 0x192) ||
           (cp >= 0x2C6 && cp <= 0x2DC) || (cp >= 0x2013 && cp <= 0x2122);
}

static int mojibake_pair(const uc *s, Py_ssize_t n) {
    unsigned previous = 0;
    for (Py_ssize_t i = 0; i < n;) {
        int len;
        unsigned cp = decode_cp(s + i, s + n, &len);
        if (previous >= 0xC2 && previous <= 0xF4 && continuation_like(cp)) return 1;
        previous = cp;
        i += len;
    }
    return 0;
}

static int is_digit(uc c) { return c >= '0' && c <= '9'; }

/* ---- hash tables of byte strings -------------------------------------------------------- */

static uint64_t bytes_hash(const uc *p, Py_ssize_t n) {
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t)n;
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, p, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
        p += 8;
        n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, p, (size_t)n);
    h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 29);
}

/* ---- suppressed addresses: SHA-256 hex of the address -> reason index ------------------- */

typedef struct SuppressionTable {
    char (*keys)[64];
    int *reasons; /* -1: empty slot */
    Py_ssize_t size;
} SuppressionTable;

static void table_free(SuppressionTable *t) {
    if (t == NULL) return;
    PyMem_RawFree(t->keys);
    PyMem_RawFree(t->reasons);
    PyMem_RawFree(t);
}

/* From the suppression snapshot's {address hash: reason}, reasons indexed into `names`. */
static SuppressionTable *table_of(PyObject *dict, PyObject *names) {
    SuppressionTable *t = PyMem_RawCalloc(1, sizeof(SuppressionTable));
    if (t == NULL) return (SuppressionTable *)PyErr_NoMemory();
    t->size = 16;
    while (t->size < PyDict_GET_SIZE(dict) * 2) t->size *= 2;
    t->keys = PyMem_RawCalloc((size_t)t->size, 64);
    t->reasons = PyMem_RawMalloc((size_t)t->size * sizeof(int));
    if (t->keys == NULL || t->reasons == NULL) {
        table_free(t);
        return (SuppressionTable *)PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < t->size; i++) t->reasons[i] = -1;
    Py_ssize_t position = 0;
    PyObject *key, *value;
    while (PyDict_Next(dict, &position, &key, &value)) {
        Py_ssize_t n = 0;
        const char *hex = PyUnicode_Check(key) ? PyUnicode_AsUTF8AndSize(key, &n) : NULL;
        Py_ssize_t index = hex && n == 64 && PyUnicode_Check(value) ? PySequence_Index(names, value) : -2;
        if (index == -1) {
            PyErr_Clear();
            index = PyList_GET_SIZE(names);
            if (PyList_Append(names, value) < 0) index = -2;
        }
        if (index < 0) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "suppressions: {sha256 hex: reason}");
            table_free(t);
            return NULL;
        }
        size_t k = (size_t)bytes_hash((const uc *)hex, 64) & (size_t)(t->size - 1);
        while (t->reasons[k] >= 0 && memcmp(t->keys[k], hex, 64) != 0) k = (k + 1) & (size_t)(t->size - 1);
        memcpy(t->keys[k], hex, 64);
        t->reasons[k] = (int)index;
    }
    return t;
}

/* The reason index an address is suppressed for, or -1. */
static int table_reason(const SuppressionTable *t, const char *address, Py_ssize_t n) {
    if (t == NULL || n == 0) return -1;
    Sha256 h;
    sha256_init(&h);
    sha256_update(&h, (const uc *)address, (size_t)n);
    char hex[64];
    sha256_hex(&h, hex);
    size_t k = (size_t)bytes_hash((const uc *)hex, 64) & (size_t)(t->size - 1);
    while (t->reasons[k] >= 0) {
        if (memcmp(t->keys[k], hex, 64) == 0) return t->reasons[k];
        k = (k + 1) & (size_t)(t->size - 1);
    }
    return -1;
}

/* ---- the compiled mapping --------------------------------------------------------------- */

enum Kind {
    K_STRING, K_EMAIL, K_PHONE, K_INTEGER, K_FLOAT, K_DECIMAL, K_BOOLEAN, K_DATE, K_DOB,
    K_DATETIME, K_ARRAY, K_OTHER, /* always the reference's coercer */
    K_TEXT,                       /* a string kept as sent, whitespace included */
    K_KINDS
};
enum IdentityKind { ID_PLAIN, ID_EMAIL, ID_PHONE };

#define MEMO_SLOTS 1024
#define MEMO_MAX_VALUE 64

/* A value the reference typed before, kept in C so that a row repeating it is typed
 * without the GIL (taking the GIL back for every row cost more than the typing itself). */
typedef struct {
    uc *data;             /* the raw text, then the JSON, then the text (NULL: slot free) */
    Py_ssize_t key_len, json_len, text_len;
    uc hash[8];
    int nulled;
    PyObject *rejection;  /* (code, message) when the value is rejected */
} Memo;

typedef struct {
    int kind, position, required, send_nulls;
    Py_ssize_t limit;
    Buf token; /* the target name as JSON */
    PyObject *source, *coerce;
    int memoize;
    Memo *memo;
} FieldSpec;

typedef struct {
    int position;
    Buf name;      /* the audience name as JSON */
    Buf attribute; /* boolean representation: its attribute as JSON */
    PyObject *label;
} AudienceSpec;

typedef struct {
    PyObject_HEAD
    Py_ssize_t columns;
    int identity_index, identity_kind, update_only, array_representation;
    PyObject *identity_slow, *row_rejected, *suppressed_raw_slow;
    Buf key_token, array_token;
    FieldSpec *fields;
    Py_ssize_t nfields;
    AudienceSpec *audiences;
    Py_ssize_t naudiences;
    int *audience_order; /* audience indices sorted by name */
    int consent_index;
    PyObject *granted;   /* tuple of str */
    Buf granted_text;    /* each granted value's UTF-8 and a NUL, one after the other */
    int *digest_positions;
    Py_ssize_t ndigest;
    int email_slot, phone_slot, email_index, phone_index;
    int suppressions;      /* whether any address is suppressed */
    struct SuppressionTable *email_table, *phone_table;
    PyObject *reasons;     /* list: the suppression reasons, by index */
} Mapping;

static void mapping_dealloc(Mapping *m) {
    for (Py_ssize_t i = 0; i < m->nfields; i++) {
        FieldSpec *f = &m->fields[i];
        PyMem_RawFree(f->token.data);
        Py_XDECREF(f->source);
        Py_XDECREF(f->coerce);
        if (f->memo) {
            for (Py_ssize_t j = 0; j < MEMO_SLOTS; j++) {
                PyMem_RawFree(f->memo[j].data);
                Py_XDECREF(f->memo[j].rejection);
            }
            PyMem_RawFree(f->memo);
        }
    }
    for (Py_ssize_t i = 0; i < m->naudiences; i++) {
        PyMem_RawFree(m->audiences[i].name.data);
        PyMem_RawFree(m->audiences[i].attribute.data);
        Py_XDECREF(m->audiences[i].label);
    }
    PyMem_RawFree(m->fields);
    PyMem_RawFree(m->audiences);
    PyMem_RawFree(m->audience_order);
    PyMem_RawFree(m->digest_positions);
    PyMem_RawFree(m->key_token.data);
    PyMem_RawFree(m->array_token.data);
    Py_XDECREF(m->identity_slow);
    Py_XDECREF(m->row_rejected);
    Py_XDECREF(m->suppressed_raw_slow);
    Py_XDECREF(m->granted);
    buf_free(&m->granted_text);
    table_free(m->email_table);
    table_free(m->phone_table);
    Py_XDECREF(m->reasons);
    Py_TYPE(m)->tp_free((PyObject *)m);
}

static int put_json_str(Buf *b, PyObject *text) {
    Py_ssize_t n;
    const char *s = PyUnicode_AsUTF8AndSize(text, &n);
    if (s == NULL) return -1;
    return put_json_bytes(b, s, n);
}

static int int_list(PyObject *list, int **out, Py_ssize_t *n) {
    PyObject *seq = PySequence_Fast(list, "expected a sequence of ints");
    if (seq == NULL) return -1;
    *n = PySequence_Fast_GET_SIZE(seq);
    *out = PyMem_RawCalloc((size_t)(*n ? *n : 1), sizeof(int));
    if (*out == NULL) {
        Py_DECREF(seq);
        no_memory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < *n; i++) {
        long v = PyLong_AsLong(PySequence_Fast_GET_ITEM(seq, i));
        if (v == -1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return -1;
        }
        (*out)[i] = (int)v;
    }
    Py_DECREF(seq);
    return 0;
}

/*
 * Mapping(columns, identity, key, update_only, fields, audiences, array_attribute,
 *         consent_index, granted, digest_positions, contact, suppressions, row_rejected)
 *   identity: (index, kind, slow)        fields: [(kind, position, target, limit,
 *   required, send_nulls, source, coerce, memoize)]   audiences: ([(position, name,
 *   attribute or None)], their indices in name order)   contact: (email_slot, phone_slot, email_index,
 *   phone_index, suppressed_raw_slow)   suppressions: (email dict, phone dict) or None
 */
static PyObject *mapping_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Py_ssize_t columns;
    int identity_index, identity_kind, update_only, consent_index;
    PyObject *identity_slow, *key, *fields, *audiences, *order, *array_attribute, *granted;
    PyObject *digest, *contact, *suppressions, *row_rejected;
    if (!PyArg_ParseTuple(args, "n(iiO)UpO(OO)OiO!OOOO", &columns, &identity_index, &identity_kind,
                          &identity_slow, &key, &update_only, &fields, &audiences, &order,
                          &array_attribute, &consent_index, &PyTuple_Type, &granted, &digest,
                          &contact, &suppressions, &row_rejected))
        return NULL;
    Mapping *m = (Mapping *)type->tp_alloc(type, 0);
    if (m == NULL) return NULL;
    m->columns = columns;
    m->identity_index = identity_index;
    m->identity_kind = identity_kind;
    m->update_only = update_only;
    m->consent_index = consent_index;
    m->identity_slow = Py_NewRef(identity_slow);
    m->row_rejected = Py_NewRef(row_rejected);
    m->granted = Py_NewRef(granted);
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(granted); i++) {
        Py_ssize_t n;
        const char *text = PyUnicode_Check(PyTuple_GET_ITEM(granted, i))
                               ? PyUnicode_AsUTF8AndSize(PyTuple_GET_ITEM(granted, i), &n) : NULL;
        if (text == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "granted values are text");
            goto fail;
        }
        if (buf_put(&m->granted_text, text, n + 1) < 0) goto fail;
    }
    if (put_json_str(&m->key_token, key) < 0) goto fail;
    m->array_representation = array_attribute != Py_None;
    if (m->array_representation && put_json_str(&m->array_token, array_attribute) < 0) goto fail;
    if (int_list(digest, &m->digest_positions, &m->ndigest) < 0) goto fail;
    if (!PyArg_ParseTuple(contact, "iiiiO", &m->email_slot, &m->phone_slot, &m->email_index,
                          &m->phone_index, &m->suppressed_raw_slow))
        goto fail;
    Py_INCREF(m->suppressed_raw_slow);
    if ((m->reasons = PyList_New(0)) == NULL) goto fail;
    if (suppressions != Py_None) {
        PyObject *emails, *phones;
        if (!PyArg_ParseTuple(suppressions, "O!O!", &PyDict_Type, &emails, &PyDict_Type, &phones) ||
            (m->email_table = table_of(emails, m->reasons)) == NULL ||
            (m->phone_table = table_of(phones, m->reasons)) == NULL)
            goto fail;
        m->suppressions = PyDict_GET_SIZE(emails) + PyDict_GET_SIZE(phones) > 0;
    }
    PyObject *seq = PySequence_Fast(fields, "fields must be a sequence");
    if (seq == NULL) goto fail;
    m->nfields = PySequence_Fast_GET_SIZE(seq);
    m->fields = PyMem_RawCalloc((size_t)(m->nfields ? m->nfields : 1), sizeof(FieldSpec));
    if (m->fields == NULL) {
        Py_DECREF(seq);
        no_memory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < m->nfields; i++) {
        FieldSpec *f = &m->fields[i];
        PyObject *target;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iiUnppOOp", &f->kind,
                              &f->position, &target, &f->limit, &f->required, &f->send_nulls,
                              &f->source, &f->coerce, &f->memoize) ||
            put_json_str(&f->token, target) < 0) {
            f->source = f->coerce = NULL;
            Py_DECREF(seq);
            goto fail;
        }
        Py_INCREF(f->source);
        Py_INCREF(f->coerce);
        if (f->kind < 0 || f->kind >= K_KINDS) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "unknown kind of value");
            goto fail;
        }
        if (f->memoize && (f->memo = PyMem_RawCalloc(MEMO_SLOTS, sizeof(Memo))) == NULL) {
            Py_DECREF(seq);
            no_memory();
            goto fail;
        }
    }
    Py_DECREF(seq);
    seq = PySequence_Fast(audiences, "audiences must be a sequence");
    if (seq == NULL) goto fail;
    m->naudiences = PySequence_Fast_GET_SIZE(seq);
    if (m->naudiences > 64) {
        Py_DECREF(seq);
        PyErr_SetString(PyExc_ValueError, "at most 64 audiences");
        goto fail;
    }
    m->audiences = PyMem_RawCalloc((size_t)(m->naudiences ? m->naudiences : 1), sizeof(AudienceSpec));
    m->audience_order = PyMem_RawCalloc((size_t)(m->naudiences ? m->naudiences : 1), sizeof(int));
    if (m->audiences == NULL || m->audience_order == NULL) {
        Py_DECREF(seq);
        no_memory();
        goto fail;
    }
    for (Py_ssize_t i = 0; i < m->naudiences; i++) {
        AudienceSpec *a = &m->audiences[i];
        PyObject *name, *attribute;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iUO", &a->position, &name,
                              &attribute) ||
            put_json_str(&a->name, name) < 0 ||
            (attribute != Py_None && put_json_str(&a->attribute, attribute) < 0)) {
            Py_DECREF(seq);
            goto fail;
        }
        a->label = Py_NewRef(name);
    }
    Py_DECREF(seq);
    PyMem_RawFree(m->audience_order);
    m->audience_order = NULL;
    Py_ssize_t ordered;
    if (int_list(order, &m->audience_order, &ordered) < 0) goto fail;
    if (ordered != m->naudiences) {
        PyErr_SetString(PyExc_ValueError, "audience order must name every audience");
        goto fail;
    }
    return (PyObject *)m;
fail:
    Py_DECREF(m);
    return NULL;
}

static PyTypeObject MappingType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "switchboard_sync.Mapping",
    .tp_basicsize = sizeof(Mapping),
    .tp_dealloc = (destructor)mapping_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = mapping_new,
    .tp_doc = "A sync's mapping compiled for one file's columns (see core/sync/native.py).",
};

/* ---- a bucket's state ------------------------------------------------------------------- */

/*
 * Stored as sections of binary records (core/sync/state_codec.py says how): a header line,
 * an 8-byte body length, the name tables, the records. Records name attributes and
 * audiences by their index in the tables, and the tables of later sections only extend
 * earlier ones, so every record is read with the last section's tables and written back
 * unchanged under those a write uses (the last ones, plus the mapping's names they lack,
 * sorted by their JSON: what state._tables_out adds).
 */
typedef struct {
    int attr; /* index in the state's attribute table */
    uc hash[8];
} Slot;

typedef struct {
    Slot *slots;
    Py_ssize_t nslots, cap;
    uint64_t owned; /* audiences Switchboard added, by audience index of the mapping */
} Profile;

enum { E_STORED = 1, E_SEEN = 2, E_DIGEST = 4, E_REWRITE = 8, E_PRESENT = 16 };
enum { R_DIGEST = 1 }; /* a record's flags */

typedef struct {
    Py_ssize_t record, record_len; /* the stored record in the text (E_STORED) */
    Py_ssize_t id, id_len;     /* identity JSON: in the text, or in the state's arena */
    Py_ssize_t tail;           /* offset of its attributes and audiences in the text */
    uc digest[8];
    int flags;
    Profile *profile; /* parsed (NULL: untouched, the stored part still holds) */
} Entry;

/* A name of the tables: its JSON in the text (a stored table) or in `names` (added). */
typedef struct {
    Py_ssize_t off, len;
    int added;
} Name;

typedef struct {
    Name *names;
    Py_ssize_t n, cap;
} NameTable;

typedef struct {
    Py_ssize_t line;
    Py_ssize_t row_at; /* the row's offset in the work lines processed (-1: a removal) */
    Py_ssize_t entry;
    Py_ssize_t off, len; /* the encoded object in `items` */
    Py_ssize_t changes, nchanges; /* in `changes` */
    uint64_t added, removed;
    uc digest[8];
    int removal; /* mirror mode: a profile absent from the export loses our audiences */
} Item;

typedef struct {
    int slot; /* field index */
    uc hash[8];
} ChangeSlot;

typedef struct {
    PyObject_HEAD
    PyObject *text; /* bytes: the snapshot's profile lines */
    int same_mapping;
    Entry *entries;
    Py_ssize_t nentries, cap;
    Py_ssize_t *table; /* open addressing: entry index + 1, 0 empty */
    Py_ssize_t table_size;
    Buf arena;         /* identities of new profiles */
    Item *items;
    Py_ssize_t nitems, items_cap;
    Buf encoded;
    ChangeSlot *changes;
    Py_ssize_t nchanges, changes_cap;
    Py_ssize_t *added_order; /* new profiles in the order they were acknowledged */
    Py_ssize_t nadded, added_cap;
    int changed;
    Py_ssize_t row_at; /* the offset of the row processed now, in the work lines */
    Mapping *mapping;
    NameTable attrs, auds; /* the last section's tables, then the mapping's names added */
    Buf names;             /* the JSON of names added */
    int *field_attr;       /* per mapping field: its attribute index */
    int *aud_table;        /* per mapping audience: its audience index */
    int *aud_mapping;      /* per audience index: the mapping's audience, or -1 */
} State;

static const uc *entry_id(const State *st, const Entry *e) {
    return (e->flags & E_STORED) ? (const uc *)PyBytes_AS_STRING(st->text) + e->id
                                 : (const uc *)st->arena.data + e->id;
}

static const char *name_at(const State *st, const Name *n) {
    return n->added ? st->names.data + n->off : PyBytes_AS_STRING(st->text) + n->off;
}

static void profile_free(Profile *p) {
    if (p == NULL) return;
    PyMem_RawFree(p->slots);
    PyMem_RawFree(p);
}

static void state_dealloc(State *st) {
    for (Py_ssize_t i = 0; i < st->nentries; i++) profile_free(st->entries[i].profile);
    PyMem_RawFree(st->entries);
    PyMem_RawFree(st->table);
    PyMem_RawFree(st->arena.data);
    PyMem_RawFree(st->items);
    PyMem_RawFree(st->encoded.data);
    PyMem_RawFree(st->changes);
    PyMem_RawFree(st->added_order);
    Py_XDECREF(st->text);
    Py_XDECREF(st->mapping);
    PyMem_RawFree(st->attrs.names);
    PyMem_RawFree(st->auds.names);
    PyMem_RawFree(st->names.data);
    PyMem_RawFree(st->field_attr);
    PyMem_RawFree(st->aud_table);
    PyMem_RawFree(st->aud_mapping);
    Py_TYPE(st)->tp_free((PyObject *)st);
}

static int grow(void **array, Py_ssize_t *cap, Py_ssize_t need, size_t size) {
    if (need <= *cap) return 0;
    Py_ssize_t next = *cap ? *cap * 2 : 256;
    while (next < need) next *= 2;
    void *grown = PyMem_RawRealloc(*array, (size_t)next * size);
    if (grown == NULL) {
        if (PyGILState_Check()) PyErr_NoMemory();
        return -1;
    }
    *array = grown;
    *cap = next;
    return 0;
}

static int table_rehash(State *st) {
    Py_ssize_t size = st->table_size ? st->table_size * 2 : 1024;
    while (size < st->nentries * 2 + 16) size *= 2;
    Py_ssize_t *table = PyMem_RawCalloc((size_t)size, sizeof(Py_ssize_t));
    if (table == NULL) {
        no_memory();
        return -1;
    }
    for (Py_ssize_t i = 0; i < st->nentries; i++) {
        const Entry *e = &st->entries[i];
        size_t k = (size_t)bytes_hash(entry_id(st, e), e->id_len) & (size_t)(size - 1);
        while (table[k]) k = (k + 1) & (size_t)(size - 1);
        table[k] = i + 1;
    }
    PyMem_RawFree(st->table);
    st->table = table;
    st->table_size = size;
    return 0;
}

/* The entry of an identity (its JSON), or -1; `*slot` is where a new one would go. */
static Py_ssize_t table_find(const State *st, const uc *id, Py_ssize_t n, size_t *slot) {
    size_t mask = (size_t)(st->table_size - 1);
    size_t k = (size_t)bytes_hash(id, n) & mask;
    while (st->table[k]) {
        const Entry *e = &st->entries[st->table[k] - 1];
        if (e->id_len == n && memcmp(entry_id(st, e), id, (size_t)n) == 0)
            return st->table[k] - 1;
        k = (k + 1) & mask;
    }
    *slot = k;
    return -1;
}

static Py_ssize_t table_add(State *st, Entry entry, size_t slot) {
    if (grow((void **)&st->entries, &st->cap, st->nentries + 1, sizeof(Entry)) < 0) return -1;
    st->entries[st->nentries++] = entry;
    if (st->nentries * 2 > st->table_size) {
        if (table_rehash(st) < 0) return -1;
    } else {
        st->table[slot] = st->nentries;
    }
    return st->nentries - 1;
}

/* A JSON string token as orjson writes it: `"` ... `"`, escapes allowed; returns its end. */
static const uc *string_token(const uc *p, const uc *end) {
    if (p >= end || *p != '"') return NULL;
    for (p++; p < end; p++) {
        if (*p == '\\') {
            p++;
            continue;
        }
        if (*p == '"') return p + 1;
    }
    return NULL;
}

/* A profile's buffers start small: a bucket holds thousands of profiles. */
static int small_reserve(Buf *b, Py_ssize_t extra) {
    if (b->cap == 0 && extra <= 480) {
        b->data = PyMem_RawMalloc(512);
        if (b->data == NULL) {
            if (PyGILState_Check()) PyErr_NoMemory();
            return -1;
        }
        b->cap = 512;
    }
    return buf_reserve(b, extra);
}

/* A varint as state_codec writes it; NULL past `end`. */
static const uc *read_varint(const uc *p, const uc *end, Py_ssize_t *value) {
    uint64_t v = 0;
    for (int shift = 0; p < end && shift < 63; shift += 7) {
        uc byte = *p++;
        v |= (uint64_t)(byte & 0x7F) << shift;
        if (byte < 0x80) {
            if (v > (uint64_t)PY_SSIZE_T_MAX) return NULL;
            *value = (Py_ssize_t)v;
            return p;
        }
    }
    return NULL;
}

static int put_varint(Buf *b, Py_ssize_t value) {
    uc out[10];
    int n = 0;
    uint64_t v = (uint64_t)value;
    while (v >= 0x80) {
        out[n++] = (uc)(v & 0x7F) | 0x80;
        v >>= 7;
    }
    out[n++] = (uc)v;
    return buf_put(b, (const char *)out, n);
}

static int popcount8(uc byte) {
    int n = 0;
    for (; byte; byte &= (uc)(byte - 1)) n++;
    return n;
}

/* Where a record's tail (attributes, audiences) ends; NULL if it runs past `end`. */
static const uc *skip_tail(const uc *p, const uc *end) {
    Py_ssize_t size, count, index;
    if ((p = read_varint(p, end, &size)) == NULL || size > end - p) return NULL;
    Py_ssize_t present = 0;
    for (Py_ssize_t i = 0; i < size; i++) present += popcount8(p[i]);
    p += size;
    if (present > (end - p) / 8) return NULL;
    p += 8 * present;
    if ((p = read_varint(p, end, &count)) == NULL) return NULL;
    for (Py_ssize_t i = 0; i < count; i++)
        if ((p = read_varint(p, end, &index)) == NULL) return NULL;
    return p;
}

static int name_add(NameTable *t, Name name) {
    if (grow((void **)&t->names, &t->cap, t->n + 1, sizeof(Name)) < 0) return ERR;
    t->names[t->n++] = name;
    return OK;
}

/* A section's table: checked against the state's, of which it must be a prefix (tables
 * only ever grow); the last section's becomes the state's. OK, PUNT or ERR. */
static int read_table(State *st, NameTable *table, const uc *base, const uc **p, const uc *end) {
    Py_ssize_t count;
    if ((*p = read_varint(*p, end, &count)) == NULL) return PUNT;
    NameTable found = {0};
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t len;
        if ((*p = read_varint(*p, end, &len)) == NULL || len > end - *p) {
            PyMem_RawFree(found.names);
            return PUNT;
        }
        if (name_add(&found, (Name){*p - base, len, 0}) < 0) {
            PyMem_RawFree(found.names);
            return ERR;
        }
        *p += len;
    }
    Py_ssize_t shared = found.n < table->n ? found.n : table->n;
    for (Py_ssize_t i = 0; i < shared; i++) {
        const Name *a = &found.names[i], *b = &table->names[i];
        if (a->len != b->len || memcmp(base + a->off, base + b->off, (size_t)a->len) != 0) {
            PyMem_RawFree(found.names);
            return PUNT; /* not an extension: the reference reads each section apart */
        }
    }
    if (found.n >= table->n) {
        PyMem_RawFree(table->names);
        *table = found;
    } else {
        PyMem_RawFree(found.names);
    }
    return OK;
}

static int index_records(State *st, const uc *base, const uc *end);

/* State(text, same_mapping): a stored state (every section), as state._profiles reads it. */
static PyObject *state_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *text;
    int same_mapping;
    if (!PyArg_ParseTuple(args, "O!p", &PyBytes_Type, &text, &same_mapping)) return NULL;
    State *st = (State *)type->tp_alloc(type, 0);
    if (st == NULL) return NULL;
    st->text = Py_NewRef(text);
    st->same_mapping = same_mapping;
    const uc *base = (const uc *)PyBytes_AS_STRING(text), *end = base + PyBytes_GET_SIZE(text);
    int status;
    /* Without the GIL: the threads fetching the next buckets decode them meanwhile. */
    Py_BEGIN_ALLOW_THREADS
    status = index_records(st, base, end);
    Py_END_ALLOW_THREADS
    if (status == OK) return (PyObject *)st;
    if (status == PUNT) PyErr_SetString(PyExc_ValueError, "sync state record not in the expected form");
    else if (!PyErr_Occurred()) PyErr_NoMemory();
    Py_DECREF(st);
    return NULL;
}

/* The entries of every section's records: OK, PUNT (not in the form), ERR (memory). A
 * later section's record of an identity takes the earlier one's place. */
static int index_records(State *st, const uc *base, const uc *end) {
    st->table_size = 1024;
    while (st->table_size < (end - base) / 64 + 16) st->table_size *= 2; /* records are larger */
    st->table = PyMem_RawCalloc((size_t)st->table_size, sizeof(Py_ssize_t));
    if (st->table == NULL) return ERR;
    for (const uc *p = base; p < end;) {
        const uc *newline = memchr(p, '\n', (size_t)(end - p));
        if (newline == NULL || *p != '{' || end - newline - 1 < 8) return PUNT;
        uint64_t length = read64(newline + 1);
        const uc *body = newline + 9;
        if (length > (uint64_t)(end - body)) return PUNT;
        const uc *body_end = body + length;
        p = body;
        TRY(read_table(st, &st->attrs, base, &p, body_end));
        TRY(read_table(st, &st->auds, base, &p, body_end));
        while (p < body_end) {
            Entry e = {0};
            e.record = p - base;
            int flags = *p++;
            if (flags & ~R_DIGEST) return PUNT;
            if (flags & R_DIGEST) {
                if (body_end - p < 8) return PUNT;
                memcpy(e.digest, p, 8);
                p += 8;
            }
            Py_ssize_t id_len;
            if ((p = read_varint(p, body_end, &id_len)) == NULL || id_len > body_end - p) return PUNT;
            e.id = p - base;
            e.id_len = id_len;
            p += id_len;
            e.tail = p - base;
            if ((p = skip_tail(p, body_end)) == NULL) return PUNT;
            e.record_len = (p - base) - e.record;
            e.flags = E_STORED | E_PRESENT;
            if (!st->same_mapping) {
                e.flags |= E_REWRITE; /* without the digests another mapping wrote */
            } else if (flags & R_DIGEST) {
                e.flags |= E_DIGEST;
            }
            size_t slot;
            Py_ssize_t known = table_find(st, base + e.id, e.id_len, &slot);
            if (known >= 0) {
                st->entries[known] = e; /* a later section's record, in the first one's place */
            } else if (table_add(st, e, slot) < 0) {
                return ERR;
            }
        }
        p = body_end;
    }
    return OK;
}

/* ---- a stored profile's attributes and audiences ------------------------------------------ */

static int profile_append(Profile *p, int attr, const uc hash[8]) {
    if (p->cap == 0) {
        p->slots = PyMem_RawMalloc(24 * sizeof(Slot));
        if (p->slots == NULL) {
            no_memory();
            return -1;
        }
        p->cap = 24;
    }
    if (grow((void **)&p->slots, &p->cap, p->nslots + 1, sizeof(Slot)) < 0) return -1;
    Slot *s = &p->slots[p->nslots++];
    s->attr = attr;
    memcpy(s->hash, hash, 8);
    return 0;
}

/* OK, PUNT (an audience the mapping does not know: the reference keeps its name), or ERR. */
static int profile_parse(const State *st, const uc *p, const uc *end, Profile **out) {
    Profile *pr = PyMem_RawCalloc(1, sizeof(Profile));
    if (pr == NULL) {
        no_memory();
        return ERR;
    }
    *out = pr;
    Py_ssize_t size = 0, count = 0, index = 0; /* read in full when the state was loaded */
    p = read_varint(p, end, &size);
    const uc *bitmap = p;
    p += size;
    for (Py_ssize_t i = 0; i < 8 * size; i++) {
        if (!(bitmap[i >> 3] >> (i & 7) & 1)) continue;
        if (i >= st->attrs.n) return PUNT;
        if (profile_append(pr, (int)i, p) < 0) return ERR;
        p += 8;
    }
    p = read_varint(p, end, &count);
    for (Py_ssize_t i = 0; i < count; i++) {
        p = read_varint(p, end, &index);
        if (index >= st->auds.n || st->aud_mapping == NULL || st->aud_mapping[index] < 0) return PUNT;
        pr->owned |= (uint64_t)1 << st->aud_mapping[index];
    }
    return OK;
}

static int entry_profile(State *st, Entry *e, Profile **out) {
    if (e->profile != NULL) {
        *out = e->profile;
        return OK;
    }
    if (!(e->flags & E_STORED)) {
        e->profile = PyMem_RawCalloc(1, sizeof(Profile));
        if (e->profile == NULL) {
            no_memory();
            return ERR;
        }
        *out = e->profile;
        return OK;
    }
    const uc *base = (const uc *)PyBytes_AS_STRING(st->text);
    Profile *parsed = NULL;
    int status = profile_parse(st, base + e->tail, base + e->record + e->record_len, &parsed);
    if (status != OK) {
        profile_free(parsed);
        return status;
    }
    e->profile = *out = parsed;
    return OK;
}

/* The index of a name in a table, or -1. */
static int name_index(const State *st, const NameTable *t, const Buf *token) {
    for (Py_ssize_t i = 0; i < t->n; i++)
        if (t->names[i].len == token->len &&
            memcmp(name_at(st, &t->names[i]), token->data, (size_t)token->len) == 0)
            return (int)i;
    return -1;
}

static const Buf *sort_tokens_base; /* qsort has no context argument */
static int compare_tokens(const void *a, const void *b) {
    const Buf *x = &sort_tokens_base[*(const int *)a], *y = &sort_tokens_base[*(const int *)b];
    Py_ssize_t n = x->len < y->len ? x->len : y->len;
    int c = memcmp(x->data, y->data, (size_t)n);
    return c ? c : (x->len > y->len) - (x->len < y->len);
}

/* Adds the tokens the table lacks, sorted by their bytes (state._tables_out); `index[i]`
 * is then each token's index. Called with the GIL held (qsort's context is global). */
static int names_extend(State *st, NameTable *t, const Buf *tokens, Py_ssize_t stride,
                        Py_ssize_t n, int *index) {
    int *missing = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(int));
    Buf *sorted = PyMem_RawMalloc((size_t)(n ? n : 1) * sizeof(Buf));
    if (missing == NULL || sorted == NULL) {
        PyMem_RawFree(missing);
        PyMem_RawFree(sorted);
        PyErr_NoMemory();
        return ERR;
    }
    Py_ssize_t nmissing = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        sorted[i] = *(const Buf *)((const char *)tokens + i * stride);
        index[i] = name_index(st, t, &sorted[i]);
        if (index[i] < 0) missing[nmissing++] = (int)i;
    }
    sort_tokens_base = sorted;
    qsort(missing, (size_t)nmissing, sizeof(int), compare_tokens);
    int status = OK;
    for (Py_ssize_t k = 0; k < nmissing && status == OK; k++) {
        int i = missing[k];
        if (k && compare_tokens(&missing[k - 1], &missing[k]) == 0) { /* one name twice */
            index[i] = index[missing[k - 1]];
            continue;
        }
        index[i] = (int)t->n;
        Name name = {st->names.len, sorted[i].len, 1};
        if (buf_put(&st->names, sorted[i].data, sorted[i].len) < 0 || name_add(t, name) < 0) status = ERR;
    }
    PyMem_RawFree(missing);
    PyMem_RawFree(sorted);
    if (status != OK && !PyErr_Occurred()) PyErr_NoMemory();
    return status;
}

/* The mapping's tables of a State, freed: no mapping is attached. */
static void detach_mapping(State *st) {
    Py_CLEAR(st->mapping);
    PyMem_RawFree(st->field_attr);
    PyMem_RawFree(st->aud_table);
    PyMem_RawFree(st->aud_mapping);
    st->field_attr = st->aud_table = st->aud_mapping = NULL;
}

/* The mapping a bucket is processed with: its names join the tables (once). The mapping is
 * recorded only once its tables are complete, so a failure (no memory) leaves none. */
static int attach_mapping(State *st, Mapping *m) {
    if (st->mapping == m) return OK;
    detach_mapping(st);
    st->field_attr = PyMem_RawMalloc((size_t)(m->nfields + 1) * sizeof(int));
    st->aud_table = PyMem_RawMalloc((size_t)(m->naudiences + 1) * sizeof(int));
    int status = st->field_attr == NULL || st->aud_table == NULL ? ERR : OK;
    if (status == OK)
        status = names_extend(st, &st->attrs, &m->fields[0].token, sizeof(FieldSpec), m->nfields, st->field_attr);
    if (status == OK)
        status = names_extend(st, &st->auds, &m->audiences[0].name, sizeof(AudienceSpec), m->naudiences, st->aud_table);
    if (status == OK) {
        st->aud_mapping = PyMem_RawMalloc((size_t)(st->auds.n + 1) * sizeof(int));
        status = st->aud_mapping == NULL ? ERR : OK;
    }
    if (status != OK) {
        detach_mapping(st);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return ERR;
    }
    for (Py_ssize_t i = 0; i < st->auds.n; i++) st->aud_mapping[i] = -1;
    for (Py_ssize_t i = 0; i < m->naudiences; i++) st->aud_mapping[st->aud_table[i]] = (int)i;
    st->mapping = (Mapping *)Py_NewRef(m);
    return OK;
}

/* ---- one row ---------------------------------------------------------------------------- */

typedef struct {
    const uc *token; /* as in the work line (JSON) */
    Py_ssize_t token_len;
    const uc *text; /* decoded */
    Py_ssize_t len;
} Value;

typedef struct {
    int present; /* 0: null */
    Py_ssize_t json, json_len; /* in the row's typed buffer */
    Py_ssize_t text, text_len; /* the string value, for email and phone */
    uc hash[8];
} Typed;

typedef struct {
    Value *values;
    Value raw;   /* the record's text, when the work line carries it (len < 0: it does not) */
    Buf scratch; /* decoded values with escapes */
    Buf typed;   /* typed values' JSON and text */
    Buf id;      /* the identity as JSON */
    Buf id_text;
    Typed *fields;
    long long line;
    /* the outcome of a rejected row */
    PyObject *code, *message;
    PyThreadState *released; /* set while this thread runs without the GIL */
    int without_gil;         /* whether rows run without the GIL (State.process) */
} Row;

/* Rows are processed without the GIL, so the threads fetching and writing other buckets
 * keep going meanwhile; Python is entered only where a row needs it (the reference's
 * coercers, rejects, suppression and consent look-ups, counts by reason). */
static void gil_take(Row *row) {
    if (row->released != NULL) {
        PyEval_RestoreThread(row->released);
        row->released = NULL;
    }
}

static void gil_give(Row *row) {
    if (row->without_gil && row->released == NULL) row->released = PyEval_SaveThread();
}

static unsigned hex4(const uc *p) {
    unsigned v = 0;
    for (int i = 0; i < 4; i++) v = v << 4 | (unsigned)(p[i] <= '9' ? p[i] - '0' : (p[i] | 0x20) - 'a' + 10);
    return v;
}

/* A JSON string token's text into `v`: as it is when it has no escapes, else decoded
 * into `*out` (which has room: decoded text is never longer than its token). PUNT for
 * escapes orjson and the splitter do not write. */
static int decode_token(const uc *p, const uc *token_end, char **out, Value *v) {
    v->token = p;
    v->token_len = token_end - p;
    const uc *s = p + 1, *e = token_end - 1;
    if (!memchr(s, '\\', (size_t)(e - s))) {
        v->text = s;
        v->len = e - s;
        return OK;
    }
    char *start = *out, *o = *out;
    while (s < e) {
        if (*s != '\\') {
            *o++ = (char)*s++;
            continue;
        }
        if (e - s < 2) return PUNT;
        uc c = s[1];
        s += 2;
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case 'b': *o++ = '\b'; break;
        case 'f': *o++ = '\f'; break;
        case 'n': *o++ = '\n'; break;
        case 'r': *o++ = '\r'; break;
        case 't': *o++ = '\t'; break;
        case 'u': {
            /* Only the escapes orjson and the splitter write (control characters
             * without a short form): values, digests and identities are compared
             * as these bytes, so any other spelling goes to the reference. */
            if (e - s < 4 || s[0] != '0' || s[1] != '0' || (s[2] != '0' && s[2] != '1') ||
                !(is_digit(s[3]) || (s[3] >= 'a' && s[3] <= 'f')))
                return PUNT;
            unsigned cp = hex4(s);
            if (cp == '\b' || cp == '\t' || cp == '\n' || cp == '\f' || cp == '\r') return PUNT;
            s += 4;
            *o++ = (char)cp;
            break;
        }
        default:
            return PUNT;
        }
    }
    v->text = (const uc *)start;
    v->len = o - start;
    *out = o;
    return OK;
}

/* `[line,"value",...]` as orjson.dumps wrote it, maybe with the record's text after the
 * values (split.work_rows); PUNT for anything but text values. */
static int parse_row(const Mapping *m, const uc *p, const uc *end, Row *row) {
    if (p >= end || *p != '[') return PUNT;
    p++;
    int negative = p < end && *p == '-';
    p += negative;
    if (p >= end || !is_digit(*p)) return PUNT;
    long long line = 0;
    int digits = 0;
    while (p < end && is_digit(*p)) {
        line = line * 10 + (*p++ - '0');
        if (++digits > 18) return PUNT;
    }
    row->line = negative ? -line : line;
    row->scratch.len = 0;
    row->raw.len = -1;
    if (buf_reserve(&row->scratch, end - p) < 0) return ERR;
    char *out = row->scratch.data;
    for (Py_ssize_t i = 0; i <= m->columns; i++) {
        if (i == m->columns && (p >= end || *p != ',')) break; /* no record text */
        if (p >= end || *p != ',') return PUNT;
        p++;
        const uc *token_end = string_token(p, end);
        if (token_end == NULL) return PUNT;
        TRY(decode_token(p, token_end, &out, i < m->columns ? &row->values[i] : &row->raw));
        p = token_end;
    }
    if (p + 1 != end || *p != ']') return PUNT;
    return OK;
}

static int is_blank(const Value *v) {
    Py_ssize_t a, b;
    strip(v->text, v->len, &a, &b);
    return a == b;
}

static PyObject *value_str(const Value *v) {
    return PyUnicode_DecodeUTF8((const char *)v->text, v->len, "strict");
}

static PyObject *row_values(const Mapping *m, const Row *row) {
    PyObject *list = PyList_New(m->columns);
    if (list == NULL) return NULL;
    for (Py_ssize_t i = 0; i < m->columns; i++) {
        PyObject *text = value_str(&row->values[i]);
        if (text == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, text);
    }
    return list;
}

/* A RowRejected raised by the reference: its code and message become the row's outcome. */
static int take_rejection(const Mapping *m, Row *row) {
    if (!PyErr_ExceptionMatches(m->row_rejected)) return ERR;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    if (value == NULL) return ERR;
    row->code = PyObject_GetAttrString(value, "code");
    row->message = row->code ? PyObject_Str(value) : NULL;
    Py_DECREF(value);
    if (row->message == NULL) {
        Py_CLEAR(row->code);
        return ERR;
    }
    return PUNT; /* here: "rejected" */
}

static int reject_with(Row *row, const char *code, PyObject *message) {
    if (message == NULL) return ERR;
    row->code = PyUnicode_FromString(code);
    row->message = message;
    if (row->code == NULL) {
        Py_CLEAR(row->message);
        return ERR;
    }
    return PUNT;
}

#define REJECTED PUNT /* in typing: the row was rejected, `row->code`/`message` are set */

/* ---- Braze's formats, the common valid forms only --------------------------------------- */

static int email_ok(const uc *s, Py_ssize_t n) {
    /* ^[^@\s]+@[^@\s]+\.[^@\s]+$ on lower-cased ASCII text, at most 254 characters */
    if (n > 254) return 0;
    Py_ssize_t at = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (s[i] == '@') {
            if (at >= 0) return 0;
            at = i;
        } else if (is_uspace(s[i])) {
            return 0;
        }
    }
    if (at < 1) return 0;
    for (Py_ssize_t i = at + 2; i < n - 1; i++)
        if (s[i] == '.') return 1;
    return 0;
}

/* E.164 from `s` into `out` (room for `cap` bytes): 0 when it is not one or does not fit. */
static int phone_normal(const uc *s, Py_ssize_t n, char *out, Py_ssize_t cap, Py_ssize_t *len) {
    if (n < 0 || n > cap) return 0;
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uc c = s[i];
        if (c == ' ' || c == '-' || c == '(' || c == ')' || c == '.') continue;
        out[k++] = (char)c;
    }
    Py_ssize_t start = 0;
    if (k >= 2 && out[0] == '0' && out[1] == '0') {
        out[1] = '+';
        start = 1;
    }
    Py_ssize_t digits = k - start - 1;
    if (k - start < 1 || out[start] != '+' || digits < 7 || digits > 15 || out[start + 1] == '0')
        return 0;
    for (Py_ssize_t i = start + 1; i < k; i++)
        if (!is_digit((uc)out[i])) return 0;
    memmove(out, out + start, (size_t)(k - start));
    *len = k - start;
    return 1;
}

static int leap(int y) { return (y % 4 == 0 && y % 100 != 0) || y % 400 == 0; }

static int days_in(int y, int mo) {
    static const int days[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    return mo == 2 && leap(y) ? 29 : days[mo - 1];
}

static int digits_at(const uc *s, int n, int *value) {
    int v = 0;
    for (int i = 0; i < n; i++) {
        if (!is_digit(s[i])) return 0;
        v = v * 10 + (s[i] - '0');
    }
    *value = v;
    return 1;
}

static int date_ok(const uc *s, Py_ssize_t n, int *year) {
    int y, mo, d;
    if (n != 10 || s[4] != '-' || s[7] != '-' || !digits_at(s, 4, &y) || !digits_at(s + 5, 2, &mo) ||
        !digits_at(s + 8, 2, &d))
        return 0;
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || d > days_in(y, mo)) return 0;
    *year = y;
    return 1;
}

/* YYYY-MM-DDTHH:MM:SS, optionally .fff or .ffffff, then Z, +00:00 or nothing (UTC). */
#define DATETIME_TEXT 27 /* YYYY-MM-DDTHH:MM:SS.ffffffZ */
static int datetime_ok(const uc *s, Py_ssize_t n, char *out, Py_ssize_t cap, Py_ssize_t *len) {
    int year, h, mi, sec;
    if (cap < DATETIME_TEXT || n < 19 || !date_ok(s, 10, &year) || s[10] != 'T' || s[13] != ':' || s[16] != ':' ||
        !digits_at(s + 11, 2, &h) || !digits_at(s + 14, 2, &mi) || !digits_at(s + 17, 2, &sec) ||
        h > 23 || mi > 59 || sec > 59)
        return 0;
    Py_ssize_t i = 19, fraction = 0;
    if (i < n && s[i] == '.') {
        while (i + 1 + fraction < n && is_digit(s[i + 1 + fraction])) fraction++;
        if (fraction != 3 && fraction != 6) return 0;
        i += 1 + fraction;
    }
    Py_ssize_t rest = n - i;
    if (!(rest == 0 || (rest == 1 && s[i] == 'Z') || (rest == 6 && memcmp(s + i, "+00:00", 6) == 0)))
        return 0;
    memcpy(out, s, 19);
    Py_ssize_t k = 19;
    int nonzero = 0;
    for (Py_ssize_t j = 0; j < fraction; j++) nonzero |= s[20 + j] != '0';
    if (nonzero) {
        out[k++] = '.';
        for (Py_ssize_t j = 0; j < 6; j++) out[k++] = j < fraction ? (char)s[20 + j] : '0';
    }
    out[k++] = 'Z';
    *len = k;
    return 1;
}

static int put_hashed_text(Buf *typed, Typed *t, const uc *s, Py_ssize_t n) {
    t->text = typed->len;
    t->text_len = n;
    if (buf_put(typed, (const char *)s, n) < 0) return ERR;
    t->json = typed->len;
    if (put_json_bytes(typed, (const char *)s, n) < 0) return ERR;
    t->json_len = typed->len - t->json;
    return value_hash8("s", 1, s, (size_t)n, t->hash) < 0 ? ERR : OK;
}

static int put_number_json(Buf *typed, Typed *t, const char *hash_prefix, const char *text,
                           Py_ssize_t n) {
    t->json = typed->len;
    if (buf_put(typed, text, n) < 0) return ERR;
    t->json_len = n;
    return value_hash8(hash_prefix, 1, (const uc *)text, (size_t)n, t->hash) < 0 ? ERR : OK;
}

/* [+-]digits[.digits][e[+-]digits], or with exponents not allowed (decimal). */
static int plain_number(const uc *s, Py_ssize_t n, int exponent) {
    Py_ssize_t i = 0;
    if (i < n && (s[i] == '+' || s[i] == '-')) i++;
    Py_ssize_t digits = 0;
    while (i < n && is_digit(s[i])) i++, digits++;
    if (!digits) return 0;
    if (i < n && s[i] == '.') {
        i++;
        Py_ssize_t fraction = 0;
        while (i < n && is_digit(s[i])) i++, fraction++;
        if (!fraction) return 0;
    }
    if (exponent && i < n && (s[i] == 'e' || s[i] == 'E')) {
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) i++;
        Py_ssize_t e = 0;
        while (i < n && is_digit(s[i])) i++, e++;
        if (!e || e > 3) return 0;
    }
    return i == n && n < 64;
}

/*
 * repr(float(text)) for plain decimals of at most 15 significant digits, from 1e-4 up:
 * such a decimal is the shortest text that reads back as its double (DBL_DIG is 15), so
 * repr gives its digits without leading or trailing zeros. orjson writes the same.
 */
static int canonical_decimal(const uc *s, Py_ssize_t n, char *out, Py_ssize_t cap, Py_ssize_t *len) {
    Py_ssize_t i = 0, k = 0;
    if (n < 1 || n > cap - 4) return 0; /* at most a sign, "0." or ".0" more than `s` */
    if (s[i] == '+' || s[i] == '-') {
        if (s[i] == '-') out[k++] = '-';
        i++;
    }
    while (i < n && s[i] == '0') i++; /* leading zeros */
    Py_ssize_t int_start = i;
    while (i < n && is_digit(s[i])) i++;
    Py_ssize_t int_len = i - int_start;
    Py_ssize_t frac_start = i < n && s[i] == '.' ? i + 1 : n, frac_end = n;
    while (frac_end > frac_start && s[frac_end - 1] == '0') frac_end--; /* trailing zeros */
    Py_ssize_t significant;
    if (int_len) {
        significant = int_len + (frac_end - frac_start);
    } else {
        Py_ssize_t z = frac_start;
        while (z < frac_end && s[z] == '0') z++;
        if (z < frac_end && z - frac_start >= 4) return 0; /* under 1e-4: repr uses an exponent */
        significant = frac_end - z;
    }
    if (significant > 15) return 0;
    if (int_len) {
        memcpy(out + k, s + int_start, (size_t)int_len);
        k += int_len;
    } else {
        out[k++] = '0';
    }
    out[k++] = '.';
    if (frac_end > frac_start) {
        memcpy(out + k, s + frac_start, (size_t)(frac_end - frac_start));
        k += frac_end - frac_start;
    } else {
        out[k++] = '0';
    }
    *len = k;
    return 1;
}

static int float_value(Buf *typed, Typed *t, const uc *s, Py_ssize_t n) {
    char text[80];
    Py_ssize_t len;
    if (!memchr(s, 'e', (size_t)n) && !memchr(s, 'E', (size_t)n) && canonical_decimal(s, n, text, (Py_ssize_t)sizeof text, &len))
        return put_number_json(typed, t, "f", text, len);
    return SLOW; /* exponents, more digits: the reference reads them */
}

/* `s` lower-cased (ASCII letters only) into `out`, which has room for `cap` bytes: 0 (and
 * nothing written) when it does not fit. Every writer of a fixed buffer checks its own
 * bound, whatever its callers checked. */
static int lower_ascii(char *out, Py_ssize_t cap, const uc *s, Py_ssize_t n) {
    if (n < 0 || n > cap) return 0;
    for (Py_ssize_t i = 0; i < n; i++) out[i] = (char)(s[i] >= 'A' && s[i] <= 'Z' ? s[i] + 32 : s[i]);
    return 1;
}

static int word_is(const char *lower, Py_ssize_t n, const char *word) {
    return (Py_ssize_t)strlen(word) == n && memcmp(lower, word, (size_t)n) == 0;
}

/* The array kind: `a|b|c`, parts stripped, empty ones dropped, duplicates collapsed. */
static int array_value(Buf *typed, Typed *t, const uc *s, Py_ssize_t n) {
    if (n && s[0] == '[') return SLOW; /* JSON arrays: the reference parses them */
    Py_ssize_t starts[100], ends[100];
    int count = 0, parts = 0; /* the limit counts items before duplicates collapse */
    for (Py_ssize_t i = 0; i <= n;) {
        const uc *bar = memchr(s + i, '|', (size_t)(n - i));
        Py_ssize_t stop = bar ? bar - s : n;
        Py_ssize_t a, b;
        strip(s + i, stop - i, &a, &b);
        if (b > a) {
            if (++parts > 100 || code_points(s + i + a, b - a) > 255) return SLOW;
            int duplicate = 0;
            for (int k = 0; k < count && !duplicate; k++)
                duplicate = ends[k] - starts[k] == b - a && memcmp(s + starts[k], s + i + a, (size_t)(b - a)) == 0;
            if (!duplicate) {
                starts[count] = i + a;
                ends[count++] = i + b;
            }
        }
        i = stop + 1;
    }
    t->json = typed->len;
    if (PUT(typed, "[") < 0) return ERR;
    for (int k = 0; k < count; k++) {
        if (k && PUT(typed, ",") < 0) return ERR;
        if (put_json_bytes(typed, (const char *)s + starts[k], ends[k] - starts[k]) < 0) return ERR;
    }
    if (PUT(typed, "]") < 0) return ERR;
    t->json_len = typed->len - t->json;
    return value_hash8("j", 1, (const uc *)typed->data + t->json, (size_t)t->json_len, t->hash) < 0 ? ERR : OK;
}

static int fast_value(const FieldSpec *f, const uc *s, Py_ssize_t n, Buf *typed, Typed *t) {
    if (f->kind == K_TEXT) {
        if (code_points(s, n) > f->limit || (!is_ascii(s, n) && mojibake_pair(s, n))) return SLOW;
        return put_hashed_text(typed, t, s, n);
    }
    Py_ssize_t a, b;
    strip(s, n, &a, &b);
    s += a;
    n = b - a;
    char work[256];
    switch (f->kind) {
    case K_STRING:
        if (code_points(s, n) > f->limit || (!is_ascii(s, n) && mojibake_pair(s, n))) return SLOW;
        return put_hashed_text(typed, t, s, n);
    case K_EMAIL:
        if (n > 254 || !is_ascii(s, n) || !lower_ascii(work, sizeof work, s, n)) return SLOW;
        if (!email_ok((const uc *)work, n)) return SLOW;
        return put_hashed_text(typed, t, (const uc *)work, n);
    case K_PHONE: {
        Py_ssize_t len;
        if (n > 64 || !is_ascii(s, n) || !phone_normal(s, n, work, sizeof work, &len)) return SLOW;
        return put_hashed_text(typed, t, (const uc *)work, len);
    }
    case K_INTEGER: {
        Py_ssize_t i = 0;
        int negative = 0;
        if (n && (s[0] == '+' || s[0] == '-')) negative = s[i++] == '-';
        if (i == n || n - i > 18) return SLOW;
        long long v = 0;
        for (; i < n; i++) {
            if (!is_digit(s[i])) return SLOW;
            v = v * 10 + (s[i] - '0');
        }
        int len = snprintf(work, sizeof work, "%lld", negative ? -v : v);
        return put_number_json(typed, t, "i", work, len);
    }
    case K_FLOAT:
        if (!plain_number(s, n, 1)) return SLOW;
        return float_value(typed, t, s, n);
    case K_DECIMAL:
        if (!plain_number(s, n, 0)) return SLOW;
        return float_value(typed, t, s, n);
    case K_BOOLEAN: {
        if (n > 5 || !lower_ascii(work, sizeof work, s, n)) return SLOW;
        const char *json;
        if (word_is(work, n, "true") || word_is(work, n, "t") || word_is(work, n, "yes") ||
            word_is(work, n, "y") || word_is(work, n, "1"))
            json = "true";
        else if (word_is(work, n, "false") || word_is(work, n, "f") || word_is(work, n, "no") ||
                 word_is(work, n, "n") || word_is(work, n, "0"))
            json = "false";
        else
            return SLOW;
        t->json = typed->len;
        t->json_len = (Py_ssize_t)strlen(json);
        if (buf_put(typed, json, t->json_len) < 0) return ERR;
        return value_hash8(json[0] == 't' ? "b1" : "b0", 2, NULL, 0, t->hash) < 0 ? ERR : OK;
    }
    case K_DATE:
    case K_DOB: {
        int year;
        if (!date_ok(s, n, &year)) return SLOW;
        if (f->kind == K_DOB && (year < 1900 || year > f->limit)) return SLOW;
        return put_hashed_text(typed, t, s, n);
    }
    case K_DATETIME: {
        Py_ssize_t len;
        if (!datetime_ok(s, n, work, sizeof work, &len)) return SLOW;
        return put_hashed_text(typed, t, (const uc *)work, len);
    }
    case K_ARRAY:
        return array_value(typed, t, s, n);
    default:
        return SLOW;
    }
}

/* The reference's coercer gives (json, hash, text or None) or raises RowRejected. */
static int take_coerced(PyObject *result, Buf *typed, Typed *t) {
    PyObject *json, *hash, *text;
    if (result == Py_None) return NULLED;
    if (!PyArg_ParseTuple(result, "SSO", &json, &hash, &text) || PyBytes_GET_SIZE(hash) != 8)
        return ERR;
    t->json = typed->len;
    t->json_len = PyBytes_GET_SIZE(json);
    if (buf_put(typed, PyBytes_AS_STRING(json), t->json_len) < 0) return ERR;
    memcpy(t->hash, PyBytes_AS_STRING(hash), 8);
    t->text = typed->len;
    t->text_len = 0;
    if (text != Py_None) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(text, &n);
        if (s == NULL || buf_put(typed, s, n) < 0) return ERR;
        t->text_len = n;
    }
    return OK;
}

/* The slot of a raw value: its own, a free one, or NULL (the neighbourhood is full). */
static Memo *memo_slot(FieldSpec *f, const uc *s, Py_ssize_t n) {
    size_t k = (size_t)bytes_hash(s, n) & (MEMO_SLOTS - 1);
    for (int probe = 0; probe < 8; probe++, k = (k + 1) & (MEMO_SLOTS - 1)) {
        Memo *slot = &f->memo[k];
        if (slot->data == NULL) return slot;
        if (slot->key_len == n && memcmp(slot->data, s, (size_t)n) == 0) return slot;
    }
    return NULL;
}

/* A value typed before, without the GIL: OK or NULLED; SLOW when it is not remembered or
 * was rejected (the caller asks the reference, with the GIL). */
static int memo_value(FieldSpec *f, const Value *v, Buf *typed, Typed *t) {
    if (f->memo == NULL || v->len > MEMO_MAX_VALUE) return SLOW;
    Memo *memo = memo_slot(f, v->text, v->len);
    if (memo == NULL || memo->data == NULL || memo->rejection != NULL) return SLOW;
    if (memo->nulled) return NULLED;
    const uc *json = memo->data + memo->key_len;
    t->json = typed->len;
    t->json_len = memo->json_len;
    if (buf_put(typed, (const char *)json, memo->json_len) < 0) return ERR;
    memcpy(t->hash, memo->hash, 8);
    t->text = typed->len;
    t->text_len = 0;
    if (memo->text_len > 0) {
        if (buf_put(typed, (const char *)json + memo->json_len, memo->text_len) < 0) return ERR;
        t->text_len = memo->text_len;
    }
    return OK;
}

/* Remember what the reference made of a raw value (its JSON, hash and text from `t`). */
static int memo_keep(Memo *memo, const Value *v, int status, const Buf *typed, const Typed *t) {
    Py_ssize_t json_len = status == OK ? t->json_len : 0, text_len = status == OK ? t->text_len : 0;
    memo->data = PyMem_RawMalloc((size_t)(v->len + json_len + text_len) + 1);
    if (memo->data == NULL) {
        PyErr_NoMemory();
        return ERR;
    }
    memcpy(memo->data, v->text, (size_t)v->len);
    memo->key_len = v->len;
    memo->nulled = status == NULLED;
    memo->json_len = json_len;
    memo->text_len = text_len;
    if (status == OK) {
        memcpy(memo->data + v->len, typed->data + t->json, (size_t)json_len);
        memcpy(memo->data + v->len + json_len, typed->data + t->text, (size_t)text_len);
        memcpy(memo->hash, t->hash, 8);
    }
    return OK;
}

static int slow_value(const Mapping *m, FieldSpec *f, const Value *v, Row *row, Typed *t) {
    Memo *memo = NULL;
    if (f->memo && v->len <= MEMO_MAX_VALUE) {
        memo = memo_slot(f, v->text, v->len);
        if (memo && memo->data) {
            if (memo->rejection != NULL) {
                row->code = Py_NewRef(PyTuple_GET_ITEM(memo->rejection, 0));
                row->message = Py_NewRef(PyTuple_GET_ITEM(memo->rejection, 1));
                return REJECTED;
            }
            return memo_value(f, v, &row->typed, t);
        }
    }
    PyObject *raw = value_str(v);
    if (raw == NULL) return ERR;
    PyObject *result = PyObject_CallOneArg(f->coerce, raw);
    Py_DECREF(raw);
    if (result == NULL) {
        int status = take_rejection(m, row);
        if (status == REJECTED && memo) {
            PyObject *rejection = PyTuple_Pack(2, row->code, row->message);
            if (rejection == NULL) return ERR;
            if (memo_keep(memo, v, status, &row->typed, t) < 0) {
                Py_DECREF(rejection);
                return ERR;
            }
            memo->rejection = rejection;
        }
        return status;
    }
    int status = take_coerced(result, &row->typed, t);
    Py_DECREF(result);
    if ((status == OK || status == NULLED) && memo && memo_keep(memo, v, status, &row->typed, t) < 0)
        status = ERR;
    return status;
}

/* ---- the identity ------------------------------------------------------------------------ */

static int identity_of(const Mapping *m, Row *row) {
    const Value *v = &row->values[m->identity_index];
    Py_ssize_t a, b;
    strip(v->text, v->len, &a, &b);
    const uc *s = v->text + a;
    Py_ssize_t n = b - a, len = n;
    char work[256];
    int fast = 0;
    row->id_text.len = 0;
    if (n == 0) {
        fast = 0;
    } else if (m->identity_kind == ID_PLAIN) {
        fast = n <= 987;
        if (fast && buf_put(&row->id_text, (const char *)s, n) < 0) return ERR;
    } else if (m->identity_kind == ID_EMAIL) {
        fast = n <= 254 && is_ascii(s, n) && lower_ascii(work, sizeof work, s, n) &&
               email_ok((const uc *)work, n);
        if (fast && buf_put(&row->id_text, work, n) < 0) return ERR;
    } else {
        fast = n <= 64 && is_ascii(s, n) && phone_normal(s, n, work, sizeof work, &len);
        if (fast && buf_put(&row->id_text, work, len) < 0) return ERR;
    }
    if (!fast) {
        gil_take(row);
        PyObject *raw = value_str(v);
        PyObject *identity = raw ? PyObject_CallOneArg(m->identity_slow, raw) : NULL;
        Py_XDECREF(raw);
        int status;
        if (identity == NULL) {
            status = raw ? take_rejection(m, row) : ERR;
        } else {
            Py_ssize_t size;
            const char *text = PyUnicode_AsUTF8AndSize(identity, &size);
            status = text == NULL || buf_put(&row->id_text, text, size) < 0 ? ERR : OK;
            Py_DECREF(identity);
        }
        gil_give(row);
        TRY(status);
    }
    row->id.len = 0;
    return put_json_bytes(&row->id, row->id_text.data, row->id_text.len) < 0 ? ERR : OK;
}

/* ---- suppression ------------------------------------------------------------------------- */

/* engine._suppressed: the reason index a typed row is suppressed for, or -1. */
static int suppressed_mapped(const Mapping *m, const Row *row) {
    const char *email = NULL, *phone = NULL;
    Py_ssize_t email_len = 0, phone_len = 0;
    if (m->identity_kind == ID_EMAIL) {
        email = row->id_text.data;
        email_len = row->id_text.len;
    } else if (m->email_slot >= 0 && row->fields[m->email_slot].present) {
        email = row->typed.data + row->fields[m->email_slot].text;
        email_len = row->fields[m->email_slot].text_len;
    }
    if (m->identity_kind == ID_PHONE) {
        phone = row->id_text.data;
        phone_len = row->id_text.len;
    } else if (m->phone_slot >= 0 && row->fields[m->phone_slot].present) {
        phone = row->typed.data + row->fields[m->phone_slot].text;
        phone_len = row->fields[m->phone_slot].text_len;
    }
    int reason = table_reason(m->email_table, email, email_len);
    return reason >= 0 ? reason : table_reason(m->phone_table, phone, phone_len);
}

/* engine._suppressed_raw, for a row acknowledged before exactly as it is, from its raw
 * `values` (and, for an e-mail or phone identity, the normalised identity): the reason
 * index or -1; SLOW when its address is not ASCII (the reference decides). */
static int suppressed_values(const Mapping *m, const Value *values, const char *id_text,
                             Py_ssize_t id_len, int *reason) {
    *reason = -1;
    if (!m->suppressions) return OK;
    /* An e-mail or phone identity is hashed where it is (the reference may have typed it:
     * 254 characters can be about 1,000 bytes); only a column's address is copied. */
    char email_work[256], phone_work[64];
    const char *email = email_work, *phone = phone_work;
    Py_ssize_t email_len = 0, phone_len = 0;
    if (m->identity_kind == ID_EMAIL) {
        email = id_text;
        email_len = id_len;
    } else if (m->email_index >= 0 && !is_blank(&values[m->email_index])) {
        const Value *v = &values[m->email_index];
        Py_ssize_t a, b;
        strip(v->text, v->len, &a, &b);
        if (b - a > 254 || !is_ascii(v->text + a, b - a) ||
            !lower_ascii(email_work, sizeof email_work, v->text + a, b - a))
            return SLOW;
        email_len = b - a;
    }
    if (m->identity_kind == ID_PHONE) {
        phone = id_text;
        phone_len = id_len;
    } else if (m->phone_index >= 0 && !is_blank(&values[m->phone_index])) {
        const Value *v = &values[m->phone_index];
        Py_ssize_t a, b;
        strip(v->text, v->len, &a, &b);
        if (b - a > 60 || !is_ascii(v->text + a, b - a) ||
            !phone_normal(v->text + a, b - a, phone_work, sizeof phone_work, &phone_len))
            return SLOW;
    }
    *reason = table_reason(m->email_table, email, email_len);
    if (*reason < 0) *reason = table_reason(m->phone_table, phone, phone_len);
    return OK;
}

static int suppressed_raw(const Mapping *m, const Row *row, int *reason) {
    return suppressed_values(m, row->values, row->id_text.data, row->id_text.len, reason);
}

/* ---- outcomes ---------------------------------------------------------------------------- */

typedef struct {
    Py_ssize_t unchanged, no_consent;
    Py_ssize_t *suppressed; /* by reason index */
    Buf withheld;           /* identity length, identity, digest: rows held back for consent */
    Buf excluded;           /* (row offset, reason index or -1 for consent): rows kept back */
    Py_ssize_t row_at;      /* the offset of the row processed now */
    PyObject *reasons;      /* dict "outcome.reason" -> count, for what Python counted */
    PyObject *rejects;      /* list of (line, code, message, values) */
} Outcomes;

static int count_reason(Outcomes *o, const char *outcome, PyObject *reason) {
    PyObject *key = PyUnicode_FromFormat("%s.%U", outcome, reason);
    if (key == NULL) return ERR;
    PyObject *current = PyDict_GetItemWithError(o->reasons, key);
    if (current == NULL && PyErr_Occurred()) {
        Py_DECREF(key);
        return ERR;
    }
    PyObject *next = PyLong_FromSsize_t((current ? PyLong_AsSsize_t(current) : 0) + 1);
    int status = next == NULL || PyDict_SetItem(o->reasons, key, next) < 0 ? ERR : OK;
    Py_XDECREF(next);
    Py_DECREF(key);
    return status;
}

/* A rejected row: (line, code, message, values, the record's text or None). */
static int reject_row(const Mapping *m, Outcomes *o, Row *row) {
    PyObject *values = row_values(m, row);
    PyObject *raw = values == NULL ? NULL : row->raw.len < 0 ? Py_NewRef(Py_None) : value_str(&row->raw);
    PyObject *entry = values && raw ? Py_BuildValue("LOOOO", row->line, row->code, row->message, values, raw)
                                    : NULL;
    Py_XDECREF(values);
    Py_XDECREF(raw);
    int status = entry == NULL || PyList_Append(o->rejects, entry) < 0 ? ERR : OK;
    if (status == OK) status = count_reason(o, "rejected", row->code);
    Py_XDECREF(entry);
    Py_CLEAR(row->code);
    Py_CLEAR(row->message);
    return status;
}

static int withhold(Outcomes *o, const Row *row, const uc digest[8]) {
    Py_ssize_t n = row->id_text.len;
    if (buf_put(&o->withheld, (const char *)&n, sizeof n) < 0 ||
        buf_put(&o->withheld, row->id_text.data, n) < 0 || buf_put(&o->withheld, (const char *)digest, 8) < 0)
        return ERR;
    return OK;
}

/* A row kept back (for the audit trail): a suppression reason's index, or -1 (consent). */
static int exclude(Outcomes *o, Py_ssize_t reason) {
    Py_ssize_t entry[2] = {o->row_at, reason};
    return buf_put(&o->excluded, (const char *)entry, sizeof entry) < 0 ? ERR : OK;
}

/* A row held back: for a suppression reason (an index), else for lack of consent. */
static int count_suppressed(Outcomes *o, int reason) {
    if (reason >= 0) o->suppressed[reason]++;
    else o->no_consent++;
    return exclude(o, reason);
}

/* The reference's answer for a row whose address C leaves to it (the GIL is held). */
static int suppressed_raw_by_reference(const Mapping *m, Row *row, Outcomes *o, int *suppressed) {
    PyObject *values = row_values(m, row);
    PyObject *found = values ? PyObject_CallOneArg(m->suppressed_raw_slow, values) : NULL;
    Py_XDECREF(values);
    if (found == NULL) return ERR;
    *suppressed = found != Py_None;
    int status = *suppressed ? count_reason(o, "suppressed", found) : OK;
    if (status == OK && *suppressed) {
        Py_ssize_t index = PySequence_Index(m->reasons, found);
        if (index < 0) PyErr_Clear(); /* a reason C's list lacks: recorded as unknown (-2) */
        status = exclude(o, index < 0 ? -2 : index);
    }
    Py_DECREF(found);
    return status;
}

/* ---- typing a row: mapping.RowMapper.map ------------------------------------------------- */

static int type_row(Mapping *m, Row *row, uint64_t *members, uint64_t *stated) {
    row->typed.len = 0;
    for (Py_ssize_t i = 0; i < m->nfields; i++) {
        FieldSpec *f = &m->fields[i];
        const Value *v = &row->values[f->position];
        Typed *t = &row->fields[i];
        t->present = 0;
        if (is_blank(v)) {
            if (f->required) {
                gil_take(row);
                int status = reject_with(row, "missing_value", PyUnicode_FromFormat("%U is required", f->source));
                gil_give(row);
                return status;
            }
            continue;
        }
        int status = fast_value(f, v->text, v->len, &row->typed, t);
        if (status == SLOW) status = memo_value(f, v, &row->typed, t);
        if (status == SLOW) {
            gil_take(row);
            status = slow_value(m, f, v, row, t);
            gil_give(row);
        }
        if (status == NULLED) continue;
        TRY(status);
        t->present = 1;
    }
    *members = *stated = 0;
    for (Py_ssize_t i = 0; i < m->naudiences; i++) {
        const Value *v = &row->values[m->audiences[i].position];
        Py_ssize_t a, b;
        strip(v->text, v->len, &a, &b);
        if (a == b) continue;
        char lower[16];
        int member = -1;
        if (b - a <= 8 && is_ascii(v->text + a, b - a) && lower_ascii(lower, sizeof lower, v->text + a, b - a)) {
            if (word_is(lower, b - a, "realized") || word_is(lower, b - a, "existing")) member = 1;
            else if (word_is(lower, b - a, "exited")) member = 0;
        } /* else not a status: non-ASCII text never lower-cases to one */
        if (member < 0) {
            gil_take(row);
            int status = reject_with(row, "invalid_membership_status",
                                     PyUnicode_FromFormat("%U: status must be realized/existing/exited",
                                                          m->audiences[i].label));
            gil_give(row);
            return status;
        }
        *stated |= (uint64_t)1 << i;
        if (member) *members |= (uint64_t)1 << i;
    }
    return OK;
}

/* `row.consent in consent.granted_values`: the stripped, lower-cased consent value. */
static int consent_granted(const Mapping *m, Row *row) {
    const Value *v = &row->values[m->consent_index];
    Py_ssize_t a, b;
    strip(v->text, v->len, &a, &b);
    if (a == b) return 0;
    char folded[64];
    if (b - a <= 64 && is_ascii(v->text + a, b - a) && lower_ascii(folded, sizeof folded, v->text + a, b - a)) {
        for (const char *g = m->granted_text.data, *end = g + m->granted_text.len; g < end;) {
            size_t n = strlen(g);
            if ((Py_ssize_t)n == b - a && memcmp(g, folded, n) == 0) return 1;
            g += n + 1;
        }
        return 0;
    }
    gil_take(row);
    PyObject *text = PyUnicode_DecodeUTF8((const char *)v->text + a, b - a, "strict");
    PyObject *lower = text ? PyObject_CallMethod(text, "lower", NULL) : NULL;
    Py_XDECREF(text);
    int granted = lower ? PySequence_Contains(m->granted, lower) : -1;
    Py_XDECREF(lower);
    gil_give(row);
    return granted;
}

/* ---- the diff and the /users/track object ------------------------------------------------ */

static const uc NULL_HASH[8] = {0};

/* The profile's slot of attribute `attr`, or -1. */
static int slot_of(const Profile *p, int attr, int hint) {
    if (hint < p->nslots && p->slots[hint].attr == attr)
        return hint; /* profiles keep the mapping's order, so this is the usual hit */
    for (Py_ssize_t i = 0; i < p->nslots; i++)
        if (p->slots[i].attr == attr) return (int)i;
    return -1;
}

static int put_audience_names(Buf *b, const Mapping *m, uint64_t set) {
    int first = 1;
    for (Py_ssize_t k = 0; k < m->naudiences; k++) {
        int i = m->audience_order[k];
        if (!(set >> i & 1)) continue;
        if (!first && PUT(b, ",") < 0) return ERR;
        first = 0;
        if (buf_put(b, m->audiences[i].name.data, m->audiences[i].name.len) < 0) return ERR;
    }
    return OK;
}

/* engine.build_item, encoded as orjson encodes it: the identity, the changed attributes
 * (typed in `row`), the membership moves. */
static int put_item(State *st, const Mapping *m, Item *item, const char *id, Py_ssize_t id_len,
                    const Row *row) {
    Buf *b = &st->encoded;
    uint64_t added = item->added, removed = item->removed;
    item->off = b->len;
    if (PUT(b, "{") < 0 || buf_put(b, m->key_token.data, m->key_token.len) < 0 || PUT(b, ":") < 0 ||
        buf_put(b, id, id_len) < 0 ||
        (m->update_only && PUT(b, ",\"_update_existing_only\":true") < 0))
        return ERR;
    for (Py_ssize_t c = item->changes; c < item->changes + item->nchanges; c++) {
        const FieldSpec *f = &m->fields[st->changes[c].slot];
        const Typed *t = &row->fields[st->changes[c].slot];
        if (PUT(b, ",") < 0 || buf_put(b, f->token.data, f->token.len) < 0 || PUT(b, ":") < 0) return ERR;
        if (t->present ? buf_put(b, row->typed.data + t->json, t->json_len) < 0 : PUT(b, "null") < 0)
            return ERR;
    }
    if (!m->array_representation) {
        for (int pass = 0; pass < 2; pass++) {
            uint64_t set = pass ? removed : added;
            for (Py_ssize_t k = 0; k < m->naudiences; k++) {
                int i = m->audience_order[k];
                if (!(set >> i & 1)) continue;
                const Buf *attribute = &m->audiences[i].attribute;
                if (PUT(b, ",") < 0 || buf_put(b, attribute->data, attribute->len) < 0) return ERR;
                if (pass ? PUT(b, ":false") < 0 : PUT(b, ":true") < 0) return ERR;
            }
        }
    } else if (added || removed) {
        if (PUT(b, ",") < 0 || buf_put(b, m->array_token.data, m->array_token.len) < 0 || PUT(b, ":{") < 0)
            return ERR;
        if (added && (PUT(b, "\"add\":[") < 0 || put_audience_names(b, m, added) < 0 || PUT(b, "]") < 0))
            return ERR;
        if (removed && ((added && PUT(b, ",") < 0) || PUT(b, "\"remove\":[") < 0 ||
                        put_audience_names(b, m, removed) < 0 || PUT(b, "]") < 0))
            return ERR;
        if (PUT(b, "}") < 0) return ERR;
    }
    if (PUT(b, "}") < 0) return ERR;
    item->len = b->len - item->off;
    return OK;
}

/* state.diff, then engine.build_item encoded as orjson encodes it; `*queued` says whether
 * anything changed. */
static int diff_and_queue(State *st, Mapping *m, Row *row, Py_ssize_t index, const uc digest[8],
                          uint64_t members, uint64_t stated, int *queued) {
    Entry *e = &st->entries[index];
    Profile *profile = NULL;
    if (e->flags & E_PRESENT) TRY(entry_profile(st, e, &profile));
    Py_ssize_t first_change = st->nchanges;
    for (Py_ssize_t i = 0; i < m->nfields; i++) {
        const Typed *t = &row->fields[i];
        int slot = profile ? slot_of(profile, st->field_attr[i], (int)i) : -1;
        const uc *stored = slot >= 0 ? profile->slots[slot].hash : NULL;
        const uc *hash;
        if (!t->present) {
            if (!m->fields[i].send_nulls || stored == NULL || memcmp(stored, NULL_HASH, 8) == 0) continue;
            hash = NULL_HASH;
        } else {
            if (stored != NULL && memcmp(stored, t->hash, 8) == 0) continue;
            hash = t->hash;
        }
        if (grow((void **)&st->changes, &st->changes_cap, st->nchanges + 1, sizeof(ChangeSlot)) < 0)
            return ERR;
        st->changes[st->nchanges].slot = (int)i;
        memcpy(st->changes[st->nchanges++].hash, hash, 8);
    }
    uint64_t owned = profile ? profile->owned : 0;
    uint64_t added = stated & members & ~owned, removed = stated & ~members & owned;
    *queued = st->nchanges > first_change || added || removed;
    if (!*queued) return OK;
    if (grow((void **)&st->items, &st->items_cap, st->nitems + 1, sizeof(Item)) < 0) return ERR;
    Item *item = &st->items[st->nitems++];
    item->line = row->line;
    item->row_at = st->row_at;
    item->entry = index;
    item->changes = first_change;
    item->nchanges = st->nchanges - first_change;
    item->added = added;
    item->removed = removed;
    memcpy(item->digest, digest, 8);
    item->removal = 0;
    return put_item(st, m, item, row->id.data, row->id.len, row);
}

/* ---- State.process: every row of a work blob ---------------------------------------------- */

static void row_free(Row *row) {
    PyMem_RawFree(row->values);
    PyMem_RawFree(row->fields);
    PyMem_RawFree(row->scratch.data);
    PyMem_RawFree(row->typed.data);
    PyMem_RawFree(row->id.data);
    PyMem_RawFree(row->id_text.data);
    Py_CLEAR(row->code);
    Py_CLEAR(row->message);
}


/* A call that needs Python, made with the GIL held. */
#define ROW_WITH_GIL(row, status, call) \
    do {                                \
        gil_take(row);                  \
        (status) = (call);              \
        gil_give(row);                  \
    } while (0)

static int process_row(State *st, Mapping *m, Row *row, PyObject *withheld, Py_ssize_t withheld_size,
                       Outcomes *o) {
    Buf *scratch = &row->typed; /* free until the row is typed */
    scratch->len = 0;
    if (PUT(scratch, "[") < 0) return ERR;
    for (Py_ssize_t i = 0; i < m->ndigest; i++) {
        const Value *v = &row->values[m->digest_positions[i]];
        if ((i && PUT(scratch, ",") < 0) || buf_put(scratch, (const char *)v->token, v->token_len) < 0)
            return ERR;
    }
    if (PUT(scratch, "]") < 0) return ERR;
    uc digest[8];
    raw_digest8((const uc *)scratch->data, (size_t)scratch->len, digest);

    int status = identity_of(m, row);
    if (status == REJECTED) {
        ROW_WITH_GIL(row, status, reject_row(m, o, row));
        return status;
    }
    TRY(status);
    size_t slot = 0;
    Py_ssize_t index = table_find(st, (const uc *)row->id.data, row->id.len, &slot);
    if (index >= 0 && (st->entries[index].flags & E_SEEN)) {
        gil_take(row);
        reject_with(row, "duplicate_identity",
                    PyUnicode_FromString("identity already appeared earlier in this file (first row wins)"));
        status = row->code == NULL ? ERR : reject_row(m, o, row);
        gil_give(row);
        return status;
    }
    if (index < 0) {
        Entry e = {0};
        e.id = st->arena.len;
        e.id_len = row->id.len;
        if (buf_put(&st->arena, row->id.data, row->id.len) < 0) return ERR;
        index = table_add(st, e, slot);
        if (index < 0) return ERR;
    }
    Entry *e = &st->entries[index];
    e->flags |= E_SEEN;
    int reason = -1;
    if ((e->flags & E_PRESENT) && (e->flags & E_DIGEST) && memcmp(e->digest, digest, 8) == 0) {
        if (suppressed_raw(m, row, &reason) == SLOW) {
            int suppressed;
            ROW_WITH_GIL(row, status, suppressed_raw_by_reference(m, row, o, &suppressed));
            TRY(status);
            if (suppressed) return OK;
        } else if (reason >= 0) {
            return count_suppressed(o, reason);
        }
        o->unchanged++;
        return OK;
    }
    if (withheld_size) {
        gil_take(row);
        int again = 0;
        PyObject *key = PyUnicode_DecodeUTF8(row->id_text.data, row->id_text.len, "strict");
        PyObject *before = key ? PyDict_GetItemWithError(withheld, key) : NULL;
        Py_XDECREF(key);
        status = key == NULL || (before == NULL && PyErr_Occurred()) ? ERR : OK;
        again = status == OK && before && PyBytes_Check(before) && PyBytes_GET_SIZE(before) == 8 &&
                memcmp(PyBytes_AS_STRING(before), digest, 8) == 0;
        int suppressed = 0;
        if (again && suppressed_raw(m, row, &reason) == SLOW)
            status = suppressed_raw_by_reference(m, row, o, &suppressed);
        gil_give(row);
        TRY(status);
        if (again) { /* its first holding back was recorded; a suppression is recorded anew */
            TRY(withhold(o, row, digest));
            if (suppressed) return OK;
            if (reason >= 0) return count_suppressed(o, reason);
            o->no_consent++;
            return OK;
        }
    }
    uint64_t members, stated;
    status = type_row(m, row, &members, &stated);
    if (status == REJECTED) {
        ROW_WITH_GIL(row, status, reject_row(m, o, row));
        return status;
    }
    TRY(status);
    if (m->suppressions) reason = suppressed_mapped(m, row);
    if (reason < 0 && m->consent_index >= 0) {
        int granted = consent_granted(m, row);
        if (granted < 0) return ERR;
        if (!granted) {
            if (e->flags & E_PRESENT) { /* a withdrawal: the reference takes our audiences back */
                Profile *profile;
                TRY(entry_profile(st, e, &profile));
                if (profile->owned) return PUNT;
            }
            TRY(withhold(o, row, digest));
            return count_suppressed(o, -1);
        }
    }
    if (reason >= 0) return count_suppressed(o, reason);
    int queued;
    TRY(diff_and_queue(st, m, row, index, digest, members, stated, &queued));
    if (!queued) {
        e = &st->entries[index];
        if ((e->flags & E_PRESENT) && (!(e->flags & E_DIGEST) || memcmp(e->digest, digest, 8) != 0)) {
            memcpy(e->digest, digest, 8);
            e->flags |= E_DIGEST | E_REWRITE;
            st->changed = 1;
        }
        o->unchanged++;
    }
    return OK;
}
#undef ROW_WITH_GIL

/* The counts kept in C, into the reasons dict (the GIL is held). */
static int merge_counts(const Mapping *m, Outcomes *o) {
    for (Py_ssize_t i = 0; i <= PyList_GET_SIZE(m->reasons); i++) {
        Py_ssize_t times = i < PyList_GET_SIZE(m->reasons) ? o->suppressed[i] : o->no_consent;
        if (times == 0) continue;
        PyObject *key = i < PyList_GET_SIZE(m->reasons)
                            ? PyUnicode_FromFormat("suppressed.%U", PyList_GET_ITEM(m->reasons, i))
                            : PyUnicode_FromString("suppressed.no_consent");
        PyObject *current = key ? PyDict_GetItemWithError(o->reasons, key) : NULL;
        PyObject *total = key && (current || !PyErr_Occurred())
                              ? PyLong_FromSsize_t((current ? PyLong_AsSsize_t(current) : 0) + times) : NULL;
        int status = total == NULL || PyDict_SetItem(o->reasons, key, total) < 0 ? ERR : OK;
        Py_XDECREF(total);
        Py_XDECREF(key);
        if (status != OK) return ERR;
    }
    return OK;
}

/* The rows held back for consent, as [(identity, digest)] in row order. */
static PyObject *withheld_list(const Outcomes *o) {
    PyObject *list = PyList_New(0);
    for (Py_ssize_t at = 0; list && at < o->withheld.len;) {
        Py_ssize_t n;
        memcpy(&n, o->withheld.data + at, sizeof n);
        at += (Py_ssize_t)sizeof n;
        PyObject *entry = Py_BuildValue("(s#y#)", o->withheld.data + at, n, o->withheld.data + at + n, (Py_ssize_t)8);
        at += n + 8;
        if (entry == NULL || PyList_Append(list, entry) < 0) Py_CLEAR(list);
        Py_XDECREF(entry);
    }
    return list;
}

/* The rows kept back, as [(offset in the work lines, reason)]: a suppression reason, or
 * "no_consent" (or "unknown" for a reason the mapping's list lacks). */
static PyObject *excluded_list(const Mapping *m, const Outcomes *o) {
    Py_ssize_t n = o->excluded.len / (Py_ssize_t)(2 * sizeof(Py_ssize_t));
    PyObject *list = PyList_New(n);
    for (Py_ssize_t i = 0; list && i < n; i++) {
        Py_ssize_t entry[2];
        memcpy(entry, o->excluded.data + i * (Py_ssize_t)sizeof entry, sizeof entry);
        PyObject *reason = entry[1] >= 0 ? Py_NewRef(PyList_GET_ITEM(m->reasons, entry[1]))
                           : PyUnicode_FromString(entry[1] == -1 ? "no_consent" : "unknown");
        PyObject *pair = reason ? Py_BuildValue("(nN)", entry[0], reason) : NULL;
        if (pair == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, pair);
    }
    return list;
}

/* process(mapping, data, withheld) -> None when the bucket is for the reference, else
 * (unchanged, reasons, rejects, withheld_now, items, excluded). */
/* Below this much work a bucket keeps the GIL: its rows take less time than taking the
 * GIL back (up to the switch interval, 5 ms, per row that needs Python) while the
 * fetching and writing threads run Python. */
#define WITHOUT_GIL_BYTES (64 * 1024)

static PyObject *state_process(State *st, PyObject *args) {
    Mapping *m;
    Py_buffer data;
    PyObject *withheld;
    if (!PyArg_ParseTuple(args, "O!y*O!", &MappingType, &m, &data, &PyDict_Type, &withheld)) return NULL;
    if (attach_mapping(st, m) != OK) {
        PyBuffer_Release(&data);
        return NULL;
    }
    Row row = {0};
    Outcomes o = {0};
    PyObject *result = NULL, *withheld_now = NULL, *excluded = NULL;
    row.values = PyMem_RawCalloc((size_t)m->columns + 1, sizeof(Value));
    row.fields = PyMem_RawCalloc((size_t)m->nfields + 1, sizeof(Typed));
    o.reasons = PyDict_New();
    o.rejects = PyList_New(0);
    o.suppressed = PyMem_RawCalloc((size_t)PyList_GET_SIZE(m->reasons) + 1, sizeof(Py_ssize_t));
    if (o.suppressed == NULL) PyErr_NoMemory();
    if (row.values == NULL || row.fields == NULL) PyErr_NoMemory();
    if (PyErr_Occurred()) goto done;
    const uc *p = data.buf, *end = p + data.len;
    int status = OK;
    Py_ssize_t withheld_size = PyDict_GET_SIZE(withheld);
    row.without_gil = data.len >= WITHOUT_GIL_BYTES;
    gil_give(&row);
    while (p < end && status == OK) {
        const uc *newline = memchr(p, '\n', (size_t)(end - p));
        const uc *line_end = newline ? newline : end;
        const uc *line = p;
        p = newline ? newline + 1 : end;
        if (line == line_end) continue;
        o.row_at = st->row_at = line - (const uc *)data.buf;
        status = parse_row(m, line, line_end, &row);
        if (status == OK) status = process_row(st, m, &row, withheld, withheld_size, &o);
    }
    gil_take(&row);
    row.without_gil = 0;
    if (status == ERR && !PyErr_Occurred()) PyErr_NoMemory();
    if (status == PUNT) {
        result = Py_NewRef(Py_None);
    } else if (status == OK) {
        if (merge_counts(m, &o) == OK && (withheld_now = withheld_list(&o)) != NULL &&
            (excluded = excluded_list(m, &o)) != NULL)
            result = Py_BuildValue("nOOOnO", o.unchanged, o.reasons, o.rejects, withheld_now, st->nitems,
                                   excluded);
    }
done:
    row_free(&row);
    Py_XDECREF(o.reasons);
    Py_XDECREF(o.rejects);
    Py_XDECREF(withheld_now);
    Py_XDECREF(excluded);
    PyMem_RawFree(o.suppressed);
    buf_free(&o.withheld);
    buf_free(&o.excluded);
    PyBuffer_Release(&data);
    return result;
}

/* ---- batches: sizes, objects, checkpoint keys, acknowledgements --------------------------- */

static int range_of(State *st, Py_ssize_t start, Py_ssize_t end) {
    if (start < 0 || end > st->nitems || start > end) {
        PyErr_SetString(PyExc_IndexError, "item range out of bounds");
        return -1;
    }
    return 0;
}

/* take(start, objects, size, max_objects, max_bytes) -> (end, size): the items from `start`
 * that still fit a batch holding `objects` objects of `size` bytes (each counted with its
 * comma, as ChunkRunner._queue counts them). */
static PyObject *state_take(State *st, PyObject *args) {
    Py_ssize_t start, objects, size, max_objects, max_bytes;
    if (!PyArg_ParseTuple(args, "nnnnn", &start, &objects, &size, &max_objects, &max_bytes) ||
        range_of(st, start, start) < 0)
        return NULL;
    Py_ssize_t end = start;
    while (end < st->nitems) {
        Py_ssize_t item = st->items[end].len + 1;
        if (objects && (objects >= max_objects || size + item > max_bytes)) break;
        objects++;
        size += item;
        end++;
    }
    return Py_BuildValue("nn", end, size);
}

static PyObject *state_encoded(State *st, PyObject *args) {
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "nn", &start, &end) || range_of(st, start, end) < 0) return NULL;
    PyObject *list = PyList_New(end - start);
    for (Py_ssize_t i = start; list && i < end; i++) {
        PyObject *item = PyBytes_FromStringAndSize(st->encoded.data + st->items[i].off, st->items[i].len);
        if (item == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i - start, item);
    }
    return list;
}

/* row_offsets(start, end): each item's row offset in the work lines it came from (-1 for
 * a removal), for the audit trail of items the destination did not apply. */
static PyObject *state_row_offsets(State *st, PyObject *args) {
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "nn", &start, &end) || range_of(st, start, end) < 0) return NULL;
    PyObject *list = PyList_New(end - start);
    for (Py_ssize_t i = start; list && i < end; i++) {
        PyObject *at = PyLong_FromSsize_t(st->items[i].row_at);
        if (at == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i - start, at);
    }
    return list;
}

/* keys(bucket, start, end): the checkpoint keys `bucket:line` (engine._item_key). */
static PyObject *state_keys(State *st, PyObject *args) {
    int bucket;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "inn", &bucket, &start, &end) || range_of(st, start, end) < 0) return NULL;
    PyObject *list = PyList_New(end - start);
    for (Py_ssize_t i = start; list && i < end; i++) {
        char key[48];
        int n = snprintf(key, sizeof key, "%d:%lld", bucket, (long long)st->items[i].line);
        PyObject *text = PyUnicode_FromStringAndSize(key, n);
        if (text == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i - start, text);
    }
    return list;
}

static int acknowledge(State *st, const Item *item) {
    Entry *e = &st->entries[item->entry];
    Profile *profile;
    TRY(entry_profile(st, e, &profile));
    for (Py_ssize_t c = item->changes; c < item->changes + item->nchanges; c++) {
        int attr = st->field_attr[st->changes[c].slot];
        int slot = slot_of(profile, attr, st->changes[c].slot);
        if (slot >= 0) memcpy(profile->slots[slot].hash, st->changes[c].hash, 8);
        else if (profile_append(profile, attr, st->changes[c].hash) < 0)
            return ERR;
    }
    profile->owned = (profile->owned | item->added) & ~item->removed;
    if (!item->removal) {
        memcpy(e->digest, item->digest, 8);
        e->flags |= E_DIGEST;
    } else { /* the destination no longer holds what the last row said: diff it next time */
        e->flags &= ~E_DIGEST;
    }
    e->flags |= E_REWRITE;
    if (!(e->flags & E_PRESENT)) {
        e->flags |= E_PRESENT;
        if (grow((void **)&st->added_order, &st->added_cap, st->nadded + 1, sizeof(Py_ssize_t)) < 0)
            return ERR;
        st->added_order[st->nadded++] = item->entry;
    }
    st->changed = 1;
    return OK;
}

/* settle(start, end, failed): the destination applied items start..end-1 but those in
 * `failed` (a container of item indices). */
static PyObject *state_settle(State *st, PyObject *args) {
    Py_ssize_t start, end;
    PyObject *failed;
    if (!PyArg_ParseTuple(args, "nnO", &start, &end, &failed) || range_of(st, start, end) < 0) return NULL;
    int none_failed = PyObject_Length(failed) == 0;
    Py_ssize_t rows = 0, removals = 0;
    PyObject *failed_removals = PyList_New(0);
    if (failed_removals == NULL) return NULL;
    for (Py_ssize_t i = start; i < end; i++) {
        if (!none_failed) {
            PyObject *key = PyLong_FromSsize_t(i);
            int found = key ? PySequence_Contains(failed, key) : -1;
            if (found > 0 && st->items[i].removal && PyList_Append(failed_removals, key) < 0) found = -1;
            Py_XDECREF(key);
            if (found < 0) {
                Py_DECREF(failed_removals);
                return NULL;
            }
            if (found) continue;
        }
        if (st->items[i].removal) removals++;
        else rows++;
        int status = acknowledge(st, &st->items[i]);
        if (status != OK) {
            if (status == PUNT) PyErr_SetString(PyExc_RuntimeError, "profile unreadable at acknowledgement");
            else if (!PyErr_Occurred()) PyErr_NoMemory();
            Py_DECREF(failed_removals);
            return NULL;
        }
    }
    return Py_BuildValue("(nnN)", rows, removals, failed_removals);
}

/* mirror() -> items, or None (a profile C does not read: the bucket goes to the
 * reference): engine._mirror_absent, after `process`: a profile of the state that no row
 * of this export named loses the audiences Switchboard gave it, lines -1, -2, ... */
static PyObject *state_mirror(State *st, PyObject *unused) {
    if (st->mapping == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "mirror() comes after process()");
        return NULL;
    }
    long long line = 0;
    for (Py_ssize_t i = 0; i < st->nentries; i++) {
        Entry *e = &st->entries[i];
        if (!(e->flags & E_STORED) || (e->flags & E_SEEN)) continue;
        Profile *profile;
        int status = entry_profile(st, e, &profile);
        if (status == PUNT) Py_RETURN_NONE;
        if (status != OK) return PyErr_Occurred() ? NULL : PyErr_NoMemory();
        if (!profile->owned) continue;
        if (grow((void **)&st->items, &st->items_cap, st->nitems + 1, sizeof(Item)) < 0) return NULL;
        Item *item = &st->items[st->nitems++];
        memset(item, 0, sizeof *item);
        item->line = --line;
        item->entry = i;
        item->changes = st->nchanges;
        item->removed = profile->owned;
        item->removal = 1;
        item->row_at = -1;
        if (put_item(st, st->mapping, item, (const char *)entry_id(st, e), e->id_len, NULL) != OK)
            return PyErr_Occurred() ? NULL : PyErr_NoMemory();
    }
    return PyLong_FromSsize_t(st->nitems);
}

/* ---- State.encode: the snapshot's records ------------------------------------------------- */

static int compare_slots(const void *a, const void *b) {
    return ((const Slot *)a)->attr - ((const Slot *)b)->attr;
}

/* A profile's record (state_codec.record): as stored when nothing changed; its stored tail
 * when only the digest did. */
static int put_record(State *st, Buf *b, const Entry *e) {
    const char *text = PyBytes_AS_STRING(st->text);
    if (!(e->flags & E_REWRITE)) return buf_put(b, text + e->record, e->record_len) < 0 ? ERR : OK;
    char flags = (char)((e->flags & E_DIGEST) ? R_DIGEST : 0);
    if (buf_put(b, &flags, 1) < 0 || ((e->flags & E_DIGEST) && buf_put(b, (const char *)e->digest, 8) < 0) ||
        put_varint(b, e->id_len) < 0 || buf_put(b, (const char *)entry_id(st, e), e->id_len) < 0)
        return ERR;
    Profile *p = e->profile;
    if (p == NULL) /* only the digest changed */
        return buf_put(b, text + e->tail, e->record + e->record_len - e->tail) < 0 ? ERR : OK;
    qsort(p->slots, (size_t)p->nslots, sizeof(Slot), compare_slots); /* the table's order */
    Py_ssize_t size = p->nslots ? p->slots[p->nslots - 1].attr / 8 + 1 : 0;
    uc bitmap[256] = {0};
    if (size > (Py_ssize_t)sizeof bitmap) return PUNT;
    for (Py_ssize_t i = 0; i < p->nslots; i++) bitmap[p->slots[i].attr >> 3] |= (uc)(1 << (p->slots[i].attr & 7));
    if (put_varint(b, size) < 0 || buf_put(b, (const char *)bitmap, size) < 0) return ERR;
    for (Py_ssize_t i = 0; i < p->nslots; i++)
        if (buf_put(b, (const char *)p->slots[i].hash, 8) < 0) return ERR;
    int owned[64], n = 0;
    for (Py_ssize_t i = 0; st->mapping != NULL && i < st->mapping->naudiences; i++)
        if (p->owned >> i & 1) {
            int index = st->aud_table[i], k = n++;
            for (; k > 0 && owned[k - 1] > index; k--) owned[k] = owned[k - 1];
            owned[k] = index;
        }
    if (put_varint(b, n) < 0) return ERR;
    for (int i = 0; i < n; i++)
        if (put_varint(b, owned[i]) < 0) return ERR;
    return OK;
}

static int put_table(State *st, Buf *b, const NameTable *t) {
    if (put_varint(b, t->n) < 0) return ERR;
    for (Py_ssize_t i = 0; i < t->n; i++)
        if (put_varint(b, t->names[i].len) < 0 || buf_put(b, name_at(st, &t->names[i]), t->names[i].len) < 0)
            return ERR;
    return OK;
}

/* encode(header) -> bytes: a section (state_codec.section) of every profile, stored ones
 * first, in their order, then new ones in the order they were acknowledged (as
 * state._encode writes the dict): the snapshot's whole text, in one copy. */
static PyObject *encode_records(State *st, PyObject *header, int changed_only) {
    Buf b = {0};
    PyObject *result = NULL;
    int status = ERR;
    if (!PyBytes_Check(header)) {
        PyErr_SetString(PyExc_TypeError, "header must be bytes");
        return NULL;
    }
    Py_ssize_t size = changed_only ? 4096 : PyBytes_GET_SIZE(st->text);
    Py_ssize_t header_len = PyBytes_GET_SIZE(header);
    if (header_len < 0 || buf_reserve(&b, size + header_len + 1024) < 0 ||
        buf_put(&b, PyBytes_AS_STRING(header), header_len) < 0 ||
        PUT(&b, "\n\0\0\0\0\0\0\0\0") < 0) /* the body's length, set below */
        goto done;
    Py_ssize_t body = b.len;
    if (put_table(st, &b, &st->attrs) < 0 || put_table(st, &b, &st->auds) < 0) goto done;
    for (Py_ssize_t i = 0; i < st->nentries; i++) {
        const Entry *e = &st->entries[i];
        if (!(e->flags & E_STORED) || (changed_only && !(e->flags & E_REWRITE))) continue;
        if ((status = put_record(st, &b, e)) != OK) goto done;
    }
    for (Py_ssize_t i = 0; i < st->nadded; i++)
        if ((status = put_record(st, &b, &st->entries[st->added_order[i]])) != OK) goto done;
    uint64_t length = (uint64_t)(b.len - body);
    for (int k = 0; k < 8; k++) b.data[body - 8 + k] = (char)(length >> (8 * k) & 0xFF);
    status = OK;
    result = PyBytes_FromStringAndSize(b.data, b.len);
done:
    if (status == PUNT) PyErr_SetString(PyExc_ValueError, "a profile has more attributes than a record holds");
    else if (result == NULL && !PyErr_Occurred()) PyErr_NoMemory();
    PyMem_RawFree(b.data);
    return result;
}

static PyObject *state_encode(State *st, PyObject *header) { return encode_records(st, header, 0); }

/* encode_changed(header) -> bytes: a section to append to the snapshot: the records of the
 * profiles this run changed (stored ones in their order, then new ones). */
static PyObject *state_encode_changed(State *st, PyObject *header) { return encode_records(st, header, 1); }

/* ---- the digest index: see split.UnchangedIndex -------------------------------------------- */


/* Sorts 8-byte big-endian digests as numbers (so in byte order): an LSD radix sort, as
 * qsort's comparison calls were most of a bucket's index. */
static int sort_digests(uint64_t *keys, Py_ssize_t n) {
    uint64_t *spare = PyMem_RawMalloc((size_t)n * sizeof(uint64_t) + 1);
    if (spare == NULL) return ERR;
    for (int shift = 0; shift < 64; shift += 8) {
        Py_ssize_t count[257] = {0};
        for (Py_ssize_t i = 0; i < n; i++) count[((keys[i] >> shift) & 0xFF) + 1]++;
        for (int b = 0; b < 256; b++) count[b + 1] += count[b];
        for (Py_ssize_t i = 0; i < n; i++) spare[count[(keys[i] >> shift) & 0xFF]++] = keys[i];
        memcpy(keys, spare, (size_t)n * sizeof(uint64_t));
    }
    PyMem_RawFree(spare);
    return OK;
}

static uint64_t digest_key(const uc d[8]) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v = v << 8 | d[i];
    return v;
}

static void put_be64(uc *out, uint64_t v) {
    for (int k = 0; k < 8; k++) out[k] = (uc)(v >> (56 - 8 * k));
}

/* digests() -> bytes: the sorted raw digests of the profiles acknowledged, 8 bytes each; a
 * digest two profiles share (never, short of a collision) is left out, as it says nothing. */
static PyObject *state_digests(State *st, PyObject *unused) {
    uint64_t *keys = PyMem_RawMalloc((size_t)st->nentries * sizeof(uint64_t) + 1);
    uc *out = PyMem_RawMalloc((size_t)st->nentries * 8 + 1);
    PyObject *result = NULL;
    Py_ssize_t n = 0, kept = 0;
    int status = OK;
    if (keys == NULL || out == NULL) goto done;
    /* With the GIL: a bucket's sort takes about 0.1 ms, and giving the GIL up for it meant
     * waiting for it again behind the threads writing buckets (0.8 ms a bucket). */
    for (Py_ssize_t i = 0; i < st->nentries; i++) {
        const Entry *e = &st->entries[i];
        if ((e->flags & E_PRESENT) && (e->flags & E_DIGEST)) keys[n++] = digest_key(e->digest);
    }
    status = sort_digests(keys, n);
    for (Py_ssize_t i = 0; status == OK && i < n; i++) {
        if ((i > 0 && keys[i] == keys[i - 1]) || (i + 1 < n && keys[i] == keys[i + 1])) continue;
        put_be64(out + 8 * kept, keys[i]);
        kept++;
    }
    if (status != OK) goto done;
    result = PyBytes_FromStringAndSize((const char *)out, kept * 8);
done:
    if (result == NULL && !PyErr_Occurred()) PyErr_NoMemory();
    PyMem_RawFree(keys);
    PyMem_RawFree(out);
    return result;
}

/* mark_seen(digests) -> profiles marked: the profiles whose rows the split settled count as
 * seen in this file (for duplicates after them, and for mirror mode). The digests go in an
 * open-addressing set (they are uniform already), looked up once per profile. */
static PyObject *state_mark_seen(State *st, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Py_ssize_t n = view.len / 8, marked = 0;
    size_t size = 16;
    while (size < (size_t)n * 2) size *= 2;
    uint64_t *set = PyMem_RawCalloc(size, sizeof(uint64_t));
    if (set == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    /* 0 marks an empty slot: a digest of 0 is looked for apart. */
    int zero = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t key = digest_key((const uc *)view.buf + 8 * i);
        if (key == 0) {
            zero = 1;
            continue;
        }
        size_t k = (size_t)key & (size - 1);
        while (set[k] && set[k] != key) k = (k + 1) & (size - 1);
        set[k] = key;
    }
    PyBuffer_Release(&view);
    for (Py_ssize_t i = 0; i < st->nentries; i++) {
        Entry *e = &st->entries[i];
        if (!(e->flags & E_PRESENT) || !(e->flags & E_DIGEST)) continue;
        uint64_t key = digest_key(e->digest);
        int found = key == 0 ? zero : 0;
        for (size_t k = (size_t)key & (size - 1); key && set[k]; k = (k + 1) & (size - 1))
            if (set[k] == key) {
                found = 1;
                break;
            }
        if (found) {
            e->flags |= E_SEEN;
            marked++;
        }
    }
    PyMem_RawFree(set);
    return PyLong_FromSsize_t(marked);
}

/* mark_seen_identities([identity]): these identities count as seen in this file (rows the
 * split settled as held back for lack of consent: they need not be profiles). */
static PyObject *state_mark_seen_identities(State *st, PyObject *identities) {
    if (!PyList_Check(identities)) {
        PyErr_SetString(PyExc_TypeError, "identities must be a list of str");
        return NULL;
    }
    Buf id = {0};
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(identities); i++) {
        Py_ssize_t n;
        const char *text = PyUnicode_AsUTF8AndSize(PyList_GET_ITEM(identities, i), &n);
        id.len = 0;
        if (text == NULL || put_json_bytes(&id, text, n) < 0) goto fail;
        size_t slot;
        Py_ssize_t index = table_find(st, (const uc *)id.data, id.len, &slot);
        if (index < 0) {
            Entry e = {0};
            e.id = st->arena.len;
            e.id_len = id.len;
            if (buf_put(&st->arena, id.data, id.len) < 0 || (index = table_add(st, e, slot)) < 0) goto fail;
        }
        st->entries[index].flags |= E_SEEN;
    }
    PyMem_RawFree(id.data);
    Py_RETURN_NONE;
fail:
    PyMem_RawFree(id.data);
    if (!PyErr_Occurred()) PyErr_NoMemory();
    return NULL;
}

static PyObject *state_get_changed(State *st, void *closure) { return PyBool_FromLong(st->changed); }

static PyObject *state_get_profiles(State *st, void *closure) {
    Py_ssize_t count = 0;
    for (Py_ssize_t i = 0; i < st->nentries; i++) count += (st->entries[i].flags & E_PRESENT) != 0;
    return PyLong_FromSsize_t(count);
}

static PyMethodDef STATE_METHODS[] = {
    {"process", (PyCFunction)state_process, METH_VARARGS,
     "process(mapping, data, withheld) -> None (the reference's) or\n"
     "(unchanged, reasons, rejects, withheld_now, items)"},
    {"take", (PyCFunction)state_take, METH_VARARGS,
     "take(start, objects, size, max_objects, max_bytes) -> (end, size)"},
    {"encoded", (PyCFunction)state_encoded, METH_VARARGS, "encoded(start, end) -> [bytes]"},
    {"keys", (PyCFunction)state_keys, METH_VARARGS, "keys(bucket, start, end) -> [checkpoint key]"},
    {"row_offsets", (PyCFunction)state_row_offsets, METH_VARARGS,
     "row_offsets(start, end) -> [offset of each item's row in its work lines, -1 for a removal]"},
    {"settle", (PyCFunction)state_settle, METH_VARARGS,
     "settle(start, end, failed) -> (rows applied, removals applied, failed removals)"},
    {"mirror", (PyCFunction)state_mirror, METH_NOARGS, "mirror() -> items, or None"},
    {"encode", (PyCFunction)state_encode, METH_O, "encode(header) -> the snapshot's text"},
    {"encode_changed", (PyCFunction)state_encode_changed, METH_O,
     "encode_changed(header) -> a section of the profiles changed, to append"},
    {"digests", (PyCFunction)state_digests, METH_NOARGS, "digests() -> sorted raw digests acknowledged"},
    {"mark_seen", (PyCFunction)state_mark_seen, METH_O, "mark_seen(digests) -> profiles marked seen"},
    {"mark_seen_identities", (PyCFunction)state_mark_seen_identities, METH_O,
     "mark_seen_identities([identity]): identities seen in this file"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef STATE_GETSET[] = {
    {"changed", (getter)state_get_changed, NULL, "whether anything was acknowledged or re-digested", NULL},
    {"profiles", (getter)state_get_profiles, NULL, "profiles the state holds", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject StateType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "switchboard_sync.State",
    .tp_basicsize = sizeof(State),
    .tp_dealloc = (destructor)state_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = state_new,
    .tp_methods = STATE_METHODS,
    .tp_getset = STATE_GETSET,
    .tp_doc = "One bucket's delta state while it is processed (see core/sync/native.py).",
};

/* ---- Splitter: a CSV file into identity buckets (core/sync/split.py) ---------------------- */

/*
 * The reference reads with Python's csv module (strict, the sync's delimiter, '"' quotes
 * doubled inside quoted fields) over text decoded as strict UTF-8, and writes each row to
 * its bucket's work blob as orjson.dumps([line, *values]). This parser takes well-formed
 * CSV; anything the csv module would report or read in its own way (a character after a
 * closing quote, a lone carriage return, NUL, a field over the size limit, a file ending
 * inside quotes) makes `feed` return None, and the file is split by the reference from its
 * start.
 */
/* Tables read at random once per row (the directory, the Bloom filter): in memory maps
 * asked for huge pages where the system has them, so a look-up misses the cache but not
 * also the TLB. Zeroed. */
typedef struct {
    void *data;
    size_t size;
} Table;

static int table_map(Table *t, size_t size) {
    t->size = size ? size : 1;
    void *data = mmap(NULL, t->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (data == MAP_FAILED) {
        t->data = NULL;
        return ERR;
    }
#ifdef MADV_HUGEPAGE
    if (t->size >= (2u << 20)) madvise(data, t->size, MADV_HUGEPAGE);
#endif
    t->data = data;
    return OK;
}

static void table_unmap(Table *t) {
    if (t->data != NULL) munmap(t->data, t->size);
    t->data = NULL;
}

typedef struct {
    PyObject_HEAD
    Py_ssize_t columns;
    int identity_index;
    uc delimiter;
    int buckets;
    Py_ssize_t ready_bytes;
    PyObject *identity_key; /* the reference's key of a non-ASCII identity */
    Buf *pending;           /* per bucket: work lines not yet handed out */
    Py_ssize_t *counts;
    Py_ssize_t rows;
    Buf fields; /* the current record's values, unquoted */
    Py_ssize_t *starts, *lens;
    Py_ssize_t fields_cap;
    Buf tokens; /* the current record's values as JSON strings (encode_fields) */
    Py_ssize_t *token_at, *token_len;
    Py_ssize_t tokens_cap;
    Buf key;
    /* Rows already acknowledged exactly as they are (use_index): settled here, unsent. */
    Mapping *mapping;
    struct BucketIndex *index; /* per bucket; NULL: every row becomes a work line */
    struct Directory *directory;
    struct LineDirectory *lines; /* the last run's lines whose digests are current (or NULL) */
    uint64_t line_seed;        /* this part's: the hash of its header line */
    int line_seed_set;
    int recording;             /* whether this file's lines are kept for the next run */
    int recording_settled;     /* those of rows settled by their line too (else a delta's) */
    Py_ssize_t settled_by_line; /* rows settled from their line's hash alone */
    Buf line_out;              /* its line index entries, until taken */
    Buf excluded;              /* settled rows kept back: reason, length, text (until taken) */
    uint64_t *seen;            /* a Bloom filter of the identity keys split so far */
    Table seen_table;
    uint64_t seen_mask;        /* its size in 512-bit blocks, minus one */
    Buf digest_text;
    Value *values;
    Py_ssize_t settled;
    int over;                  /* settled() was taken: the split is over */
    Py_ssize_t max_record;     /* a longer record (bytes, line breaks included): PUNT */
    Py_ssize_t max_field;      /* a longer field: PUNT (the reference rejects the file) */
} Splitter;

typedef struct {
    Buf settled; /* digests of the rows settled */
} DigestSet;

typedef struct BucketIndex {
    int present;       /* whether the bucket has an index */
    DigestSet profiles; /* of the bucket's acknowledged profiles */
    DigestSet withheld; /* of the rows its last run held back for lack of consent */
    Py_ssize_t unchanged;
    Py_ssize_t *suppressed; /* by the mapping's reason index; then for lack of consent */
} BucketIndex;

/* Every bucket's digests in one table, so a row's digest finds its bucket before the
 * bucket is hashed from its identity: the digest covers the identity's raw value, so a
 * match is a profile of the bucket that identity hashes to. BLAKE2b of the identity (the
 * bucket) and the binary search of a bucket's digests were a third of a split of a file
 * mostly unchanged. Counting-sorted on the top `shift`-complement bits: `start[slot]`
 * to `start[slot + 1]` hold the digests whose top bits are `slot` (about four). */
#define WITHHELD_FLAG 0x8000u
typedef struct Directory {
    uint64_t *keys;
    uint16_t *refs; /* bucket, | WITHHELD_FLAG for a row held back for lack of consent */
    uint32_t *start;
    int shift;
    Table key_table, ref_table, start_table;
} Directory;

/* The last run's line index (core/sync/lines.py): the entries whose digest a bucket's index
 * holds, in an open-addressing table keyed by the line's hash, 16 bytes an entry (the
 * digest is the directory's, by its place there): a row whose line is byte for byte one
 * whose raw digest a bucket acknowledged (or held back) is settled from the line's hash,
 * not parsed. Filled a chunk at a time as the index is read, so it is never held whole. */
#define LINE_AMBIGUOUS UINT32_MAX /* a line hash two entries have: it settles nothing */
typedef struct {
    uint64_t key;      /* the line's hash; 0: an empty slot */
    uint32_t seen_lo;  /* the identity's key for the Bloom filter (its low 32 bits) */
    uint32_t digest_at; /* the digest's place in the directory */
} LineSlot;

typedef struct LineDirectory {
    LineSlot *slots;
    uint64_t size; /* any size (not a power of two): a hash's slot is its place in [0, size) */
    uint64_t room; /* entries it takes at most: an empty slot always ends a probe */
    Table slot_table;
} LineDirectory;

/* The first slot a line hash probes: its high bits scaled to the table (Lemire's range
 * reduction), which lets the table be sized to its entries rather than to a power of two. */
static inline uint64_t line_slot(const LineDirectory *d, uint64_t key) {
    return (uint64_t)(((unsigned __int128)key * d->size) >> 64);
}

static inline uint64_t line_next(const LineDirectory *d, uint64_t i) {
    return i + 1 == d->size ? 0 : i + 1;
}

static void line_directory_free(LineDirectory *d) {
    if (d == NULL) return;
    table_unmap(&d->slot_table);
    PyMem_RawFree(d);
}

static void directory_free(Directory *d) {
    if (d == NULL) return;
    table_unmap(&d->key_table);
    table_unmap(&d->ref_table);
    table_unmap(&d->start_table);
    PyMem_RawFree(d);
}

static void index_free(Splitter *sp) {
    if (sp->index)
        for (int i = 0; i < sp->buckets; i++) {
            BucketIndex *ix = &sp->index[i];
            PyMem_RawFree(ix->profiles.settled.data);
            PyMem_RawFree(ix->withheld.settled.data);
            PyMem_RawFree(ix->suppressed);
        }
    PyMem_RawFree(sp->index);
    directory_free(sp->directory);
    sp->directory = NULL;
    line_directory_free(sp->lines);
    sp->lines = NULL;
    table_unmap(&sp->seen_table);
    PyMem_RawFree(sp->digest_text.data);
    PyMem_RawFree(sp->values);
    Py_CLEAR(sp->mapping);
    sp->index = NULL;
    sp->seen = NULL;
    sp->values = NULL;
    sp->digest_text = (Buf){0};
}

static void splitter_dealloc(Splitter *sp) {
    if (sp->pending)
        for (int i = 0; i < sp->buckets; i++) PyMem_RawFree(sp->pending[i].data);
    PyMem_RawFree(sp->pending);
    PyMem_RawFree(sp->counts);
    PyMem_RawFree(sp->fields.data);
    PyMem_RawFree(sp->starts);
    PyMem_RawFree(sp->lens);
    PyMem_RawFree(sp->key.data);
    PyMem_RawFree(sp->line_out.data);
    PyMem_RawFree(sp->excluded.data);
    PyMem_RawFree(sp->tokens.data);
    PyMem_RawFree(sp->token_at);
    PyMem_RawFree(sp->token_len);
    index_free(sp);
    Py_XDECREF(sp->identity_key);
    Py_TYPE(sp)->tp_free((PyObject *)sp);
}

#define DEFAULT_FIELD_LIMIT (1 << 20)

/* Splitter(columns, identity_index, delimiter, buckets, ready_bytes, identity_key) */
static PyObject *splitter_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Py_ssize_t columns, ready_bytes;
    int identity_index, buckets;
    const char *delimiter;
    Py_ssize_t delimiter_len;
    PyObject *identity_key;
    if (!PyArg_ParseTuple(args, "nis#inO", &columns, &identity_index, &delimiter, &delimiter_len,
                          &buckets, &ready_bytes, &identity_key))
        return NULL;
    if (delimiter_len != 1 || (uc)delimiter[0] >= 0x80 || delimiter[0] == '"' ||
        delimiter[0] == '\r' || delimiter[0] == '\n' || buckets < 1 || columns < 1 ||
        identity_index < 0 || identity_index >= columns) {
        PyErr_SetString(PyExc_ValueError, "unsupported splitter settings");
        return NULL;
    }
    Splitter *sp = (Splitter *)type->tp_alloc(type, 0);
    if (sp == NULL) return NULL;
    sp->columns = columns;
    sp->identity_index = identity_index;
    sp->delimiter = (uc)delimiter[0];
    sp->buckets = buckets;
    sp->ready_bytes = ready_bytes;
    sp->identity_key = Py_NewRef(identity_key);
    sp->max_record = PY_SSIZE_T_MAX;
    sp->max_field = DEFAULT_FIELD_LIMIT;
    sp->pending = PyMem_RawCalloc((size_t)buckets, sizeof(Buf));
    sp->counts = PyMem_RawCalloc((size_t)buckets, sizeof(Py_ssize_t));
    if (sp->pending == NULL || sp->counts == NULL) {
        Py_DECREF(sp);
        return PyErr_NoMemory();
    }
    return (PyObject *)sp;
}


/* Strict UTF-8 (what the reference's decoder takes): the length of valid text from p. */
static Py_ssize_t utf8_valid(const uc *p, Py_ssize_t n) {
    Py_ssize_t i = 0;
    while (i < n) {
        uint64_t word;
        if (i + 8 <= n && (memcpy(&word, p + i, 8), (word & 0x8080808080808080ULL) == 0)) {
            i += 8; /* ASCII, most text */
            continue;
        }
        uc c = p[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int len = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
        if (len == 0 || i + len > n) return i;
        uc c1 = p[i + 1];
        if ((c1 & 0xC0) != 0x80 || (c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 > 0x9F) ||
            (c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 > 0x8F))
            return i;
        for (int k = 2; k < len; k++)
            if ((p[i + k] & 0xC0) != 0x80) return i;
        i += len;
    }
    return i;
}

static int add_field(Splitter *sp, Py_ssize_t *count, Py_ssize_t start) {
    if (*count >= sp->fields_cap) {
        Py_ssize_t cap = sp->fields_cap ? sp->fields_cap * 2 : 64;
        Py_ssize_t *starts = PyMem_RawRealloc(sp->starts, (size_t)cap * sizeof(Py_ssize_t));
        if (starts == NULL) return ERR;
        sp->starts = starts;
        Py_ssize_t *lens = PyMem_RawRealloc(sp->lens, (size_t)cap * sizeof(Py_ssize_t));
        if (lens == NULL) return ERR;
        sp->lens = lens;
        sp->fields_cap = cap;
    }
    sp->starts[*count] = start;
    sp->lens[*count] = sp->fields.len - start;
    (*count)++;
    return OK;
}

/*
 * One record from p: OK with `*next` after it, PUNT, or SLOW when the data ends inside it
 * (more is needed). `*lines` counts the physical lines it spans.
 */
static int split_record(Splitter *sp, const uc *p, const uc *end, int final, const uc **next,
                        Py_ssize_t *count, long long *lines) {
    sp->fields.len = 0;
    *count = 0;
    *lines = 0;
    if (buf_reserve(&sp->fields, end - p) < 0) return ERR;
    char *out = sp->fields.data;
    uc d = sp->delimiter;
    if (p < end && (*p == '\n' || *p == '\r')) { /* a blank line: no fields */
        if (*p == '\r' && p + 1 >= end) return final ? PUNT : SLOW;
        if (*p == '\r' && p[1] != '\n') return PUNT;
        *next = p + (*p == '\r' ? 2 : 1);
        *lines = 1;
        return OK;
    }
    for (;;) {
        Py_ssize_t start = out - sp->fields.data;
        if (p < end && *p == '"') {
            p++;
            for (;;) {
                const uc *quote = memchr(p, '"', (size_t)(end - p));
                if (quote == NULL) return final ? PUNT : SLOW;
                for (const uc *q = p; q < quote; q++) {
                    if (*q == '\n') (*lines)++;
                    else if (*q == '\r' && (q + 1 >= quote || q[1] != '\n')) return PUNT;
                    else if (*q == 0) return PUNT;
                }
                memcpy(out, p, (size_t)(quote - p));
                out += quote - p;
                p = quote + 1;
                if (p < end && *p == '"') { /* a doubled quote */
                    *out++ = '"';
                    p++;
                    continue;
                }
                if (p >= end && !final) return SLOW;
                break;
            }
            if (p < end && *p != d && *p != '\n' && *p != '\r') return PUNT;
        } else {
            const uc *q = p;
            while (q < end && *q != d && *q != '\n' && *q != '\r') {
                if (*q == 0) return PUNT;
                q++;
            }
            if (q >= end && !final) return SLOW;
            memcpy(out, p, (size_t)(q - p));
            out += q - p;
            p = q;
        }
        sp->fields.len = out - sp->fields.data;
        if (sp->fields.len - start > sp->max_field) return PUNT;
        if (add_field(sp, count, start) < 0) return ERR;
        if (p < end && *p == d) {
            p++;
            continue;
        }
        if (p < end && *p == '\r') {
            if (p + 1 >= end) return final ? PUNT : SLOW;
            if (p[1] != '\n') return PUNT;
            p++;
        }
        if (p < end) p++; /* the newline */
        (*lines)++;
        *next = p;
        return OK;
    }
}

/* split.bucket_of's hash of an identity key; the bucket is this modulo the buckets. */
static uint64_t key_hash(const uc *key, Py_ssize_t n) {
    uc digest[8];
    hash8("", 0, key, (size_t)n, digest);
    uint64_t value = 0;
    for (int i = 0; i < 8; i++) value = value << 8 | digest[i];
    return value;
}

/* The key hash of an identity that is not ASCII: split.identity_key (the GIL is held);
 * `seen` is the Bloom filter's hash of the same key. */
static int identity_hash(Splitter *sp, const uc *s, Py_ssize_t n, uint64_t *hash, uint64_t *seen) {
    PyObject *raw = PyUnicode_DecodeUTF8((const char *)s, n, "strict");
    PyObject *key = raw ? PyObject_CallOneArg(sp->identity_key, raw) : NULL;
    Py_XDECREF(raw);
    if (key == NULL) return ERR;
    Py_ssize_t size;
    const char *text = PyUnicode_AsUTF8AndSize(key, &size);
    if (text != NULL) {
        *hash = key_hash((const uc *)text, size);
        *seen = xxh64((const uc *)text, (size_t)size);
    }
    Py_DECREF(key);
    return text ? OK : ERR;
}

/* ---- rows settled in the split: see split.UnchangedIndex ------------------------------------ */

#define SEEN_PROBES 6

/* Adds an identity key to the Bloom filter; whether it may have been there already. A false
 * "maybe" only sends a row on to its bucket, which decides as it always does. Blocked: a
 * key's probes are all in one 64-byte block, so a row costs one cache miss, not six. */
/* The Bloom filter's key of an identity's XXH64: from its low 32 bits, which is what a line
 * index entry keeps of it (a rare collision only sends a row on to its bucket). */
static uint64_t bloom_key(uint64_t seen) {
    uint64_t z = (seen & 0xFFFFFFFFu) + 0x9E3779B97F4A7C15ULL; /* splitmix64 */
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static uint64_t *bloom_block(Splitter *sp, uint64_t seen) {
    return sp->seen + 8 * (bloom_key(seen) & sp->seen_mask);
}

static int seen_before(Splitter *sp, uint64_t identity_key) {
    uint64_t key = bloom_key(identity_key);
    uint64_t *block = sp->seen + 8 * (key & sp->seen_mask);
    int seen = 1;
    for (int i = 0; i < SEEN_PROBES; i++) {
        unsigned bit = (unsigned)(key >> (16 + 9 * i)) & 511;
        uint64_t mask = 1ULL << (bit & 63);
        if (!(block[bit >> 6] & mask)) {
            seen = 0;
            block[bit >> 6] |= mask;
        }
    }
    return seen;
}

/* The digest's entry: its bucket and whether it was held back, or -1 if it is in no
 * bucket's index. A digest in two entries (one bucket's profiles and rows held back, or,
 * short of a collision never, two buckets) is resolved by hashing the identity's bucket
 * after all: `bucket` is called for it. */
static int directory_find(const Directory *d, uint64_t key, int (*bucket)(void *), void *context) {
    uint64_t slot = key >> d->shift;
    int found = -1, twice = 0;
    for (uint32_t i = d->start[slot]; i < d->start[slot + 1]; i++) {
        if (d->keys[i] != key) continue;
        if (found >= 0) twice = 1;
        else found = d->refs[i];
    }
    if (!twice) return found;
    if (bucket == NULL) return -1; /* no identity to tell them apart: neither */
    int wanted = bucket(context), best = -1;
    for (uint32_t i = d->start[slot]; i < d->start[slot + 1]; i++)
        if (d->keys[i] == key && (d->refs[i] & ~WITHHELD_FLAG) == (unsigned)wanted &&
            (best < 0 || !(d->refs[i] & WITHHELD_FLAG)))
            best = d->refs[i];
    return best;
}

typedef struct {
    const uc *key;
    Py_ssize_t len;
    int buckets;
} KeyBucket;

static int bucket_of_key(void *context) {
    const KeyBucket *k = context;
    return (int)(key_hash(k->key, k->len) % (uint64_t)k->buckets);
}

/* A settled row that is suppressed: its reason index and its record's text, for the audit
 * trail (Splitter.excluded). */
static int exclude_settled(Splitter *sp, int reason, const uc *record, Py_ssize_t len) {
    if (reason < 0) return OK; /* unchanged, or held back again: its first holding back was recorded */
    Py_ssize_t head[2] = {reason, len};
    if (buf_put(&sp->excluded, (const char *)head, sizeof head) < 0 ||
        buf_put(&sp->excluded, (const char *)record, len) < 0)
        return ERR;
    return OK;
}

/* The row settled in its bucket's tally: a profile acknowledged as it is (unchanged), or a
 * row held back for lack of consent again, or, either way, suppressed for `reason`. */
static int settle_counted(Splitter *sp, int bucket, int withheld, const uc digest[8], int reason) {
    BucketIndex *ix = &sp->index[bucket];
    DigestSet *set = withheld ? &ix->withheld : &ix->profiles;
    if (buf_put(&set->settled, (const char *)digest, 8) < 0) return ERR;
    if (reason >= 0) ix->suppressed[reason]++;
    else if (withheld) ix->suppressed[PyList_GET_SIZE(sp->mapping->reasons)]++;
    else ix->unchanged++;
    return OK;
}

/*
 * Settles a row here when its bucket would count it without sending anything: its
 * identity key was not split before in this file (the caller checked the Bloom filter:
 * it is no duplicate, and no earlier row of that identity is waiting in the bucket) and
 * its raw digest is one a bucket's state acknowledged (engine: unchanged_raw; counted
 * unchanged) or held back for lack of consent (withheld_again; counted suppressed), or,
 * either way, suppressed if its address is now. Anything less certain goes on to the
 * bucket. `*bucket` is the digest's bucket when it has one (-1: hash the identity).
 */
static int settle_row(Splitter *sp, const uc *identity, Py_ssize_t identity_len, const uc digest[8],
                      const uc *record, Py_ssize_t record_len, int *bucket, int *settled) {
    *settled = 0;
    *bucket = -1;
    const Mapping *m = sp->mapping;
    KeyBucket key = {identity, identity_len, sp->buckets};
    int ref = directory_find(sp->directory, digest_key(digest), bucket_of_key, &key);
    if (ref < 0) return OK;
    *bucket = ref & ~WITHHELD_FLAG;
    int reason = -1;
    if (m->suppressions) {
        int at[2] = {m->email_index, m->phone_index};
        for (int i = 0; i < 2; i++)
            if (at[i] >= 0) {
                sp->values[at[i]].text = (const uc *)sp->fields.data + sp->starts[at[i]];
                sp->values[at[i]].len = sp->lens[at[i]];
            }
        if (suppressed_values(m, sp->values, (const char *)identity, identity_len, &reason) == SLOW) return OK;
    }
    *settled = 1;
    TRY(exclude_settled(sp, reason, record, record_len));
    return settle_counted(sp, *bucket, ref & WITHHELD_FLAG, digest, reason);
}

/* The record's values as JSON strings, comma-separated as the work line has them: each
 * escaped once for both the work line and the raw digest. */
static int encode_fields(Splitter *sp, Py_ssize_t count) {
    if (count > sp->tokens_cap) {
        Py_ssize_t *at = PyMem_RawRealloc(sp->token_at, (size_t)count * sizeof(Py_ssize_t));
        if (at == NULL) return ERR;
        sp->token_at = at;
        Py_ssize_t *len = PyMem_RawRealloc(sp->token_len, (size_t)count * sizeof(Py_ssize_t));
        if (len == NULL) return ERR;
        sp->token_len = len;
        sp->tokens_cap = count;
    }
    Buf *t = &sp->tokens;
    t->len = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (i && PUT(t, ",") < 0) return ERR;
        sp->token_at[i] = t->len;
        if (put_json_bytes(t, sp->fields.data + sp->starts[i], sp->lens[i]) < 0) return ERR;
        sp->token_len[i] = t->len - sp->token_at[i];
    }
    return OK;
}

/* The raw digest of the record encoded last (state.raw_digest of the mapping's values). */
static int row_digest(Splitter *sp, uc digest[8]) {
    const Mapping *m = sp->mapping;
    Buf *t = &sp->digest_text;
    t->len = 0;
    if (PUT(t, "[") < 0) return ERR;
    for (Py_ssize_t i = 0; i < m->ndigest; i++) {
        int at = m->digest_positions[i];
        if ((i && PUT(t, ",") < 0) || buf_put(t, sp->tokens.data + sp->token_at[at], sp->token_len[at]) < 0)
            return ERR;
    }
    if (PUT(t, "]") < 0) return ERR;
    raw_digest8((const uc *)t->data, (size_t)t->len, digest);
    return OK;
}

/* A line of this file for the next run's line index: its hash, its raw digest and its
 * identity's key (unchanged.LineIndex). */
static int record_line(Splitter *sp, uint64_t line_hash, const uc digest[8], uint64_t seen_key) {
    uc entry[24];
    put_be64(entry, line_hash);
    memcpy(entry + 8, digest, 8);
    put_be64(entry + 16, seen_key);
    return buf_put(&sp->line_out, (const char *)entry, 24) < 0 ? ERR : OK;
}

/* The entry of a line hash, or NULL (none, or two: a collision settles nothing). */
static const LineSlot *line_find(const LineDirectory *d, uint64_t key) {
    if (key == 0) return NULL;
    for (uint64_t i = line_slot(d, key);; i = line_next(d, i)) {
        const LineSlot *slot = &d->slots[i];
        if (slot->key == key) return slot->digest_at == LINE_AMBIGUOUS ? NULL : slot;
        if (slot->key == 0) return NULL;
    }
}

/* Where the record from p ends, by its quotes (a line break inside quotes has an odd
 * number of quotes before it): the byte after its line break, with `*text_end` the end of
 * its text (before "\r\n" or "\n") and `*lines` the lines it spans; NULL when the data ends
 * first. Only for records of well-formed files: a line that hashes as one acknowledged
 * before is such a record, and any other goes on to split_record. */
static const uc *record_end(const uc *p, const uc *end, const uc **text_end, long long *lines) {
    int quoted = 0;
    *lines = 0;
    for (const uc *q = p;;) {
        const uc *newline = memchr(q, '\n', (size_t)(end - q));
        if (newline == NULL) return NULL;
        /* A lone CR or a NUL: what split_record leaves to the reference, never settled
         * (whatever a line index says: lines before and after would be numbered apart). */
        if (memchr(q, 0, (size_t)(newline - q)) != NULL) return NULL;
        for (const uc *cr = memchr(q, '\r', (size_t)(newline - q)); cr != NULL;
             cr = memchr(cr + 1, '\r', (size_t)(newline - cr - 1)))
            if (cr + 1 != newline) return NULL;
        for (const uc *x = memchr(q, '"', (size_t)(newline - q)); x != NULL;
             x = memchr(x + 1, '"', (size_t)(newline - x - 1)))
            quoted ^= 1;
        (*lines)++;
        if (!quoted) {
            *text_end = newline > p && newline[-1] == '\r' ? newline - 1 : newline;
            return newline + 1;
        }
        q = newline + 1;
    }
}

/*
 * Settles a row from its line alone when the line is, byte for byte (under the same
 * header), one a profile of a bucket was acknowledged from: its raw values are then that
 * profile's (settle_row's condition, without parsing), its identity is that profile's (so
 * the Bloom filter is asked with the profile's key), and, when addresses are suppressed,
 * the row is parsed after all to look its addresses up. Anything less certain goes on.
 */
static int settle_line(Splitter *sp, const uc *p, const uc *next_record, uint64_t line_hash,
                       const LineSlot *slot, const uc *end, int final, int *settled) {
    *settled = 0;
    if (slot == NULL || seen_before(sp, slot->seen_lo)) return OK;
    unsigned ref = sp->directory->refs[slot->digest_at];
    const Mapping *m = sp->mapping;
    int reason = -1;
    if (m->suppressions) {
        const uc *next;
        Py_ssize_t count;
        long long lines;
        int status = split_record(sp, p, end, final, &next, &count, &lines);
        if (status == ERR) return ERR;
        if (status != OK || count != sp->columns) return OK;
        const uc *identity = (const uc *)sp->fields.data + sp->starts[sp->identity_index];
        Py_ssize_t a, b;
        strip(identity, sp->lens[sp->identity_index], &a, &b);
        if (m->identity_kind == ID_EMAIL && b - a > 254) return OK;
        if (buf_reserve(&sp->key, b - a + 1) < 0) return ERR;
        lower_ascii(sp->key.data, sp->key.cap, identity + a, b - a);
        int at[2] = {m->email_index, m->phone_index};
        for (int i = 0; i < 2; i++)
            if (at[i] >= 0) {
                sp->values[at[i]].text = (const uc *)sp->fields.data + sp->starts[at[i]];
                sp->values[at[i]].len = sp->lens[at[i]];
            }
        if (suppressed_values(m, sp->values, sp->key.data, b - a, &reason) == SLOW) return OK;
    }
    *settled = 1;
    const uc *record_end = next_record;
    if (record_end > p && record_end[-1] == '\n') record_end--;
    if (record_end > p && record_end[-1] == '\r') record_end--;
    TRY(exclude_settled(sp, reason, p, record_end - p));
    uc digest[8];
    put_be64(digest, sp->directory->keys[slot->digest_at]);
    TRY(settle_counted(sp, ref & ~WITHHELD_FLAG, ref & WITHHELD_FLAG, digest, reason));
    return sp->recording_settled ? record_line(sp, line_hash, digest, slot->seen_lo) : OK;
}

/*
 * Rows ahead of the one split now, for the line path: a record's look-ups (the table's slot,
 * then the Bloom filter's block and the digest) each miss the cache, so they are asked for
 * in stages some records ahead (prefetched) and found in cache when the record comes. The records ahead are found by their quotes (record_end); when the record split
 * now is not the one expected (a record split_record reads otherwise), the ring starts again
 * from it.
 */
#define AHEAD 16
#define AHEAD_FOUND 8   /* its table slot read: the Bloom filter block and the digest prefetched */

typedef struct {
    const uc *start, *next;
    long long lines;
    uint64_t hash;  /* 0: an empty line */
    int stage;      /* 2: entry found (its table slot is prefetched when it is queued) */
    const LineSlot *slot;
} Ahead;

typedef struct {
    Ahead rows[AHEAD];
    int head, count;
    const uc *scan; /* where the next record ahead starts */
} Ring;

static void ring_advance(Splitter *sp, Ahead *a, int stage) {
    const LineDirectory *d = sp->lines;
    if (a->hash == 0) {
        a->stage = 2;
        return;
    }
    if (a->stage < 1 && stage >= 1) {
        const LineSlot *slot = line_find(d, a->hash); /* its table slot was prefetched */
        if (slot != NULL) {
            __builtin_prefetch(bloom_block(sp, slot->seen_lo));
            __builtin_prefetch(&sp->directory->keys[slot->digest_at]);
            __builtin_prefetch(&sp->directory->refs[slot->digest_at]);
        }
        a->slot = slot;
        a->stage = 2;
    }
}

/* The record at `p` with its look-ups done, or NULL (the ring does not know it). */
static Ahead *ring_take(Splitter *sp, Ring *r, const uc *p, const uc *end) {
    if (r->count == 0 || r->rows[r->head].start != p) {
        r->count = 0;
        r->scan = p;
    }
    while (r->count < AHEAD && r->scan < end) {
        Ahead *a = &r->rows[(r->head + r->count) % AHEAD];
        const uc *text_end;
        a->start = r->scan;
        a->next = record_end(r->scan, end, &text_end, &a->lines);
        if (a->next == NULL) {
            r->scan = end; /* the rest is left to split_record */
            break;
        }
        a->hash = text_end > a->start ? xxh64_seeded(a->start, (size_t)(text_end - a->start), sp->line_seed) : 0;
        if (a->hash != 0) __builtin_prefetch(&sp->lines->slots[line_slot(sp->lines, a->hash)]);
        a->stage = 0;
        a->slot = NULL;
        r->scan = a->next;
        r->count++;
    }
    if (r->count == 0) return NULL;
    if (r->count > AHEAD_FOUND) ring_advance(sp, &r->rows[(r->head + AHEAD_FOUND) % AHEAD], 1);
    Ahead *a = &r->rows[r->head];
    ring_advance(sp, a, 1);
    r->head = (r->head + 1) % AHEAD;
    r->count--;
    return a;
}

/* A bucket's sorted, distinct 8-byte digests: their number, or -1 (an error is set). */
static Py_ssize_t checked_digests(PyObject *item) {
    if (!PyBytes_Check(item) || PyBytes_GET_SIZE(item) % 8) {
        PyErr_SetString(PyExc_ValueError, "digests: bytes of 8-byte digests");
        return -1;
    }
    const uc *d = (const uc *)PyBytes_AS_STRING(item);
    Py_ssize_t n = PyBytes_GET_SIZE(item) / 8;
    for (Py_ssize_t k = 1; k < n; k++)
        if (memcmp(d + 8 * (k - 1), d + 8 * k, 8) >= 0) {
            PyErr_SetString(PyExc_ValueError, "digests must be sorted and distinct");
            return -1;
        }
    return n;
}

/* Room for `count` settled digests, allocated at its size. */
static int digests_reserve(Buf *b, Py_ssize_t count) {
    if (count == 0) return OK;
    if ((b->data = PyMem_RawMalloc((size_t)count * 8)) == NULL) return -1;
    b->cap = count * 8;
    return OK;
}

/* Places a bucket's digests in the directory (`start` counts, then positions). */
static void directory_put(Directory *d, PyObject *item, uint16_t ref, int place) {
    const uc *digests = (const uc *)PyBytes_AS_STRING(item);
    for (Py_ssize_t k = 0; k < PyBytes_GET_SIZE(item) / 8; k++) {
        uint64_t key = digest_key(digests + 8 * k), slot = key >> d->shift;
        if (!place) {
            d->start[slot + 1]++;
            continue;
        }
        uint32_t at = d->start[slot]++;
        d->keys[at] = key;
        d->refs[at] = ref;
    }
}

/* The directory of every present bucket's (profiles, withheld) digests; NULL on no memory. */
static Directory *directory_of(PyObject *index, Py_ssize_t total) {
    Directory *d = PyMem_RawCalloc(1, sizeof(Directory));
    if (d == NULL) return NULL;
    int bits = 1; /* about four digests a slot: `start` stays mostly in cache */
    while (bits < 40 && ((Py_ssize_t)1 << bits) < total / 4) bits++;
    d->shift = 64 - bits;
    size_t slots = (size_t)1 << bits;
    if (table_map(&d->key_table, (size_t)total * sizeof(uint64_t)) != OK ||
        table_map(&d->ref_table, (size_t)total * sizeof(uint16_t)) != OK ||
        table_map(&d->start_table, (slots + 1) * sizeof(uint32_t)) != OK) {
        directory_free(d);
        return NULL;
    }
    d->keys = d->key_table.data;
    d->refs = d->ref_table.data;
    d->start = d->start_table.data;
    for (int place = 0; place < 2; place++) {
        for (Py_ssize_t i = 0; i < PyList_GET_SIZE(index); i++) {
            PyObject *item = PyList_GET_ITEM(index, i);
            if (item == Py_None) continue;
            directory_put(d, PyTuple_GET_ITEM(item, 0), (uint16_t)i, place);
            directory_put(d, PyTuple_GET_ITEM(item, 1), (uint16_t)(i | WITHHELD_FLAG), place);
        }
        if (place == 0) /* counts to starts; placing moves each start to the next slot's */
            for (size_t slot = 0; slot < slots; slot++) d->start[slot + 1] += d->start[slot];
        else
            for (size_t slot = slots; slot > 0; slot--) d->start[slot] = d->start[slot - 1];
    }
    d->start[0] = 0;
    return d;
}

/* The place of a digest in the directory, or -1 (in no bucket's index, or in two). */
static Py_ssize_t directory_position(const Directory *d, uint64_t key) {
    uint64_t slot = key >> d->shift;
    Py_ssize_t found = -1;
    for (uint32_t i = d->start[slot]; i < d->start[slot + 1]; i++) {
        if (d->keys[i] != key) continue;
        if (found >= 0) return -1;
        found = i;
    }
    return found;
}

/* An empty line table for at most `entries` entries (a load of at most three quarters:
 * linear probing stays short, and the look-ups are prefetched anyway). */
static LineDirectory *line_directory_new(Py_ssize_t entries) {
    LineDirectory *d = PyMem_RawCalloc(1, sizeof(LineDirectory));
    if (d == NULL) return NULL;
    d->size = (uint64_t)entries + (uint64_t)entries / 3 + 1024;
    d->room = (uint64_t)entries + 1;
    if (table_map(&d->slot_table, (size_t)d->size * sizeof(LineSlot)) != OK) {
        line_directory_free(d);
        return NULL;
    }
    d->slots = d->slot_table.data;
    return d;
}

/* The entries of `lines` (24 bytes each: line hash, digest, identity key) whose digest is in
 * one bucket's index (the directory), into the table; how many went in. */
static Py_ssize_t line_directory_add(LineDirectory *d, const Directory *digests, const uc *lines, Py_ssize_t n) {
    Py_ssize_t added = 0;
    for (Py_ssize_t k = 0; k < n; k++) {
        /* A look-up misses the cache twice (the slot, then its keys): asked for ahead. */
        if (k + 16 < n) __builtin_prefetch(&digests->start[digest_key(lines + 24 * (k + 16) + 8) >> digests->shift]);
        if (k + 8 < n) {
            uint64_t ahead = digest_key(lines + 24 * (k + 8));
            __builtin_prefetch(&digests->keys[digests->start[digest_key(lines + 24 * (k + 8) + 8) >> digests->shift]]);
            __builtin_prefetch(&d->slots[line_slot(d, ahead)]);
        }
        const uc *entry = lines + 24 * k;
        uint64_t key = digest_key(entry);
        Py_ssize_t at = directory_position(digests, digest_key(entry + 8));
        if (key == 0 || at < 0 || d->room == 0) continue;
        for (uint64_t i = line_slot(d, key);; i = line_next(d, i)) {
            LineSlot *slot = &d->slots[i];
            if (slot->key == key) {
                slot->digest_at = LINE_AMBIGUOUS;
                break;
            }
            if (slot->key == 0) {
                slot->key = key;
                slot->seen_lo = (uint32_t)digest_key(entry + 16);
                slot->digest_at = (uint32_t)at;
                d->room--;
                added++;
                break;
            }
        }
    }
    return added;
}

/* use_index(mapping, index, lines): `index` has, per bucket, None or (profiles, withheld):
 * the sorted raw digests its state acknowledged and those it held back for lack of consent
 * (8 bytes each); `lines`, the last run's line index entries; rows are then settled here
 * where they can be. */
static PyObject *splitter_use_index(Splitter *sp, PyObject *args) {
    Mapping *m;
    PyObject *index;
    Py_buffer lines = {0};
    if (!PyArg_ParseTuple(args, "O!O!y*", &MappingType, &m, &PyList_Type, &index, &lines)) return NULL;
    if (m->columns != sp->columns || m->identity_index != sp->identity_index ||
        m->identity_kind == ID_PHONE || PyList_GET_SIZE(index) != sp->buckets || sp->rows ||
        lines.len % 24) {
        PyErr_SetString(PyExc_ValueError, "the index is for another file, identity or split");
        PyBuffer_Release(&lines);
        return NULL;
    }
    index_free(sp);
    sp->mapping = (Mapping *)Py_NewRef(m);
    sp->index = PyMem_RawCalloc((size_t)sp->buckets, sizeof(BucketIndex));
    sp->values = PyMem_RawCalloc((size_t)sp->columns, sizeof(Value));
    if (sp->index == NULL || sp->values == NULL) goto no_memory;
    Py_ssize_t total = 0, reasons = PyList_GET_SIZE(m->reasons) + 1;
    for (int i = 0; i < sp->buckets; i++) {
        PyObject *item = PyList_GET_ITEM(index, i);
        if (item == Py_None) continue;
        BucketIndex *ix = &sp->index[i];
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_SetString(PyExc_ValueError, "index: per bucket None or (profiles, withheld)");
            goto fail;
        }
        Py_ssize_t profiles = checked_digests(PyTuple_GET_ITEM(item, 0));
        Py_ssize_t withheld = profiles < 0 ? -1 : checked_digests(PyTuple_GET_ITEM(item, 1));
        if (withheld < 0) goto fail;
        ix->suppressed = PyMem_RawCalloc((size_t)reasons, sizeof(Py_ssize_t));
        if (ix->suppressed == NULL) goto no_memory;
        /* A digest is settled at most once (its identity's first row only): sized once,
         * the buffers leave no holes behind in the heap, as growing them did. */
        if (digests_reserve(&ix->profiles.settled, profiles) < 0 ||
            digests_reserve(&ix->withheld.settled, withheld) < 0)
            goto no_memory;
        ix->present = 1;
        total += profiles + withheld;
    }
    if (total >= (Py_ssize_t)UINT32_MAX || lines.len / 24 >= (Py_ssize_t)UINT32_MAX ||
        sp->buckets > (int)(WITHHELD_FLAG - 1)) {
        PyErr_SetString(PyExc_ValueError, "index too large");
        goto fail;
    }
    /* Without the GIL: the threads reading state and the file go on meanwhile. `index` is
     * this call's own list of bytes, which nothing else changes while it runs. */
    Directory *directory;
    Py_BEGIN_ALLOW_THREADS
    directory = directory_of(index, total);
    Py_END_ALLOW_THREADS
    sp->directory = directory;
    if (sp->directory == NULL) goto no_memory;
    if (lines.len && (sp->lines = line_directory_new(lines.len / 24)) == NULL) goto no_memory;
    if (lines.len) line_directory_add(sp->lines, sp->directory, lines.buf, lines.len / 24);
    PyBuffer_Release(&lines);
    /* 16 bits per expected row: under 0.1% of first rows sent on to their bucket needlessly. */
    uint64_t bits = 1 << 23;
    while (bits < (uint64_t)total * 16) bits <<= 1;
    if (table_map(&sp->seen_table, (size_t)(bits / 8)) != OK) goto no_memory;
    sp->seen = sp->seen_table.data;
    sp->seen_mask = bits / 512 - 1;
    Py_RETURN_NONE;
no_memory:
    PyErr_NoMemory();
fail:
    PyBuffer_Release(&lines);
    index_free(sp);
    return NULL;
}

/* lines_begin(entries): the last run's line index entries come next (lines_add), about
 * this many (they size the table); after use_index. */
static PyObject *splitter_lines_begin(Splitter *sp, PyObject *arg) {
    Py_ssize_t entries = PyLong_AsSsize_t(arg);
    if (entries == -1 && PyErr_Occurred()) return NULL;
    if (sp->directory == NULL || sp->lines != NULL || sp->rows || entries < 0) {
        PyErr_SetString(PyExc_ValueError, "lines_begin comes once, after use_index, before any row");
        return NULL;
    }
    if ((sp->lines = line_directory_new(entries)) == NULL) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* lines_add(entries) -> how many went in: a chunk of the last run's line index entries
 * (24 bytes each), those whose digest a bucket's index holds; at most as many in all as
 * lines_begin said (any more are left out: their rows are parsed). */
static PyObject *splitter_lines_add(Splitter *sp, PyObject *arg) {
    Py_buffer lines;
    if (PyObject_GetBuffer(arg, &lines, PyBUF_SIMPLE) < 0) return NULL;
    if (sp->lines == NULL || sp->rows || lines.len % 24) {
        PyBuffer_Release(&lines);
        PyErr_SetString(PyExc_ValueError, "lines_add takes whole entries, after lines_begin");
        return NULL;
    }
    Py_ssize_t added;
    Py_BEGIN_ALLOW_THREADS
    added = line_directory_add(sp->lines, sp->directory, lines.buf, lines.len / 24);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&lines);
    return PyLong_FromSsize_t(added);
}

/* record_lines(mapping, settled_too): this file's lines are kept for the next run's line
 * index (take_lines), with the raw digests this mapping gives, those of rows settled by
 * their line too or (a delta on the last run's) not; after use_index, if that is used. */
static PyObject *splitter_record_lines(Splitter *sp, PyObject *args) {
    Mapping *m;
    int settled_too;
    if (!PyArg_ParseTuple(args, "O!p", &MappingType, &m, &settled_too)) return NULL;
    if (m->columns != sp->columns || m->identity_index != sp->identity_index || sp->rows ||
        (sp->mapping != NULL && sp->mapping != m)) {
        PyErr_SetString(PyExc_ValueError, "the mapping is for another file, identity or split");
        return NULL;
    }
    if (sp->mapping == NULL) sp->mapping = (Mapping *)Py_NewRef(m);
    sp->recording = 1;
    sp->recording_settled = settled_too;
    Py_RETURN_NONE;
}

/* take_lines() -> bytes: the line index entries kept since the last call. */
static PyObject *splitter_take_lines(Splitter *sp, PyObject *unused) {
    PyObject *taken = PyBytes_FromStringAndSize(sp->line_out.data ? sp->line_out.data : "", sp->line_out.len);
    sp->line_out.len = 0;
    return taken;
}

/* settled() -> per bucket None, or (profile digests, withheld digests, unchanged,
 * {"suppressed.<reason>": rows}) of the rows settled; once, at the end: the splitter lets
 * go of its look-up tables, and of each bucket's digests as they are handed over, so they
 * are never held twice. */
/* excluded() -> [(reason, record text)]: the settled rows kept back since the last call
 * (a suppression reason, or "no_consent"), for the audit trail. */
static PyObject *splitter_excluded(Splitter *sp, PyObject *unused) {
    (void)unused;
    PyObject *list = PyList_New(0);
    for (Py_ssize_t at = 0; list && at < sp->excluded.len;) {
        Py_ssize_t head[2];
        memcpy(head, sp->excluded.data + at, sizeof head);
        at += (Py_ssize_t)sizeof head;
        PyObject *reason = head[0] >= 0 && sp->mapping != NULL
                               ? Py_NewRef(PyList_GET_ITEM(sp->mapping->reasons, head[0]))
                               : PyUnicode_FromString("no_consent");
        PyObject *entry = reason ? Py_BuildValue("(Ny#)", reason, sp->excluded.data + at, head[1]) : NULL;
        at += head[1];
        if (entry == NULL || PyList_Append(list, entry) < 0) Py_CLEAR(list);
        Py_XDECREF(entry);
    }
    sp->excluded.len = 0;
    return list;
}

static PyObject *splitter_settled(Splitter *sp, PyObject *unused) {
    if (sp->over) {
        PyErr_SetString(PyExc_ValueError, "settled() was taken already");
        return NULL;
    }
    sp->over = 1;
    directory_free(sp->directory);
    sp->directory = NULL;
    line_directory_free(sp->lines);
    sp->lines = NULL;
    table_unmap(&sp->seen_table);
    sp->seen = NULL;
    PyObject *list = PyList_New(sp->buckets);
    for (int i = 0; list && i < sp->buckets; i++) {
        BucketIndex *ix = sp->index ? &sp->index[i] : NULL;
        PyObject *entry = Py_None, *reasons = NULL;
        if (ix && ix->present && (ix->profiles.settled.len || ix->withheld.settled.len)) {
            Py_ssize_t nreasons = PyList_GET_SIZE(sp->mapping->reasons);
            reasons = PyDict_New();
            for (Py_ssize_t r = 0; reasons && r <= nreasons; r++) {
                if (!ix->suppressed[r]) continue;
                PyObject *key = r < nreasons
                                    ? PyUnicode_FromFormat("suppressed.%U", PyList_GET_ITEM(sp->mapping->reasons, r))
                                    : PyUnicode_FromString("suppressed.no_consent");
                PyObject *times = PyLong_FromSsize_t(ix->suppressed[r]);
                if (key == NULL || times == NULL || PyDict_SetItem(reasons, key, times) < 0) Py_CLEAR(reasons);
                Py_XDECREF(key);
                Py_XDECREF(times);
            }
            /* (y# turns a NULL buffer into None) */
            const char *profiles = ix->profiles.settled.data ? ix->profiles.settled.data : "";
            const char *withheld = ix->withheld.settled.data ? ix->withheld.settled.data : "";
            entry = reasons ? Py_BuildValue("(y#y#nO)", profiles, ix->profiles.settled.len, withheld,
                                            ix->withheld.settled.len, ix->unchanged, reasons)
                            : NULL;
            Py_XDECREF(reasons);
            PyMem_RawFree(ix->profiles.settled.data);
            PyMem_RawFree(ix->withheld.settled.data);
            ix->profiles.settled = ix->withheld.settled = (Buf){0};
        } else {
            Py_INCREF(entry);
        }
        if (entry == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, entry);
    }
    index_free(sp);
    return list;
}

/* The work line of the record encoded last: [line, value, ...] (split.work_rows), and the
 * record's text after the values when it holds a quote (it then differs from the values
 * joined by the delimiter: a reject shows the original). */
static int put_work_line(Splitter *sp, Buf *b, long long line, Py_ssize_t count, const uc *raw,
                         Py_ssize_t raw_len) {
    char number[32];
    int n = snprintf(number, sizeof number, "[%lld", line);
    if (n < 0 || n >= (int)sizeof number || buf_reserve(b, n + sp->tokens.len + 3) < 0) return ERR;
    char *out = b->data + b->len;
    memcpy(out, number, (size_t)n);
    out += n;
    if (count) *out++ = ',';
    memcpy(out, sp->tokens.data, (size_t)sp->tokens.len);
    out += sp->tokens.len;
    b->len = out - b->data;
    if (raw != NULL && memchr(raw, '"', (size_t)raw_len) != NULL) {
        if (PUT(b, ",") < 0 || put_json_bytes(b, (const char *)raw, raw_len) < 0) return ERR;
    }
    return PUT(b, "]\n") < 0 ? ERR : OK;
}

/*
 * feed(data, line, final) -> None (for the reference), or (consumed, line, malformed,
 * ready, bad_utf8): the records of `data` up to the last complete one are split into their
 * buckets; `line` is the number of the next record's first line; `ready` lists (bucket,
 * work lines) of buckets that hold at least `ready_bytes`; `bad_utf8` is the offset of the
 * first byte that is not UTF-8, or -1.
 */
static PyObject *splitter_feed(Splitter *sp, PyObject *args) {
    Py_buffer data;
    long long line;
    int final;
    if (!PyArg_ParseTuple(args, "y*Lp", &data, &line, &final)) return NULL;
    if (sp->over) {
        PyBuffer_Release(&data);
        PyErr_SetString(PyExc_ValueError, "the split is over (settled() was taken)");
        return NULL;
    }
    const uc *base = data.buf, *p = base;
    PyObject *malformed = PyList_New(0), *ready = PyList_New(0), *result = NULL;
    Py_ssize_t bad = -1;
    int status = OK;
    if (malformed == NULL || ready == NULL) goto done;
    /* The parsing runs without the GIL, so the threads uploading work blocks and the
     * storage SDK's Python keep going meanwhile; Python is entered only to hand over
     * results and for identities that are not ASCII. */
    PyThreadState *released = PyEval_SaveThread();
#define WITH_GIL(statement)                  \
    do {                                     \
        PyEval_RestoreThread(released);      \
        statement;                           \
        released = PyEval_SaveThread();      \
    } while (0)
    Py_ssize_t valid = utf8_valid(p, data.len);
    if (valid < data.len && (final || data.len - valid >= 4)) {
        bad = valid; /* records before it are still split: the file is rejected anyway */
    }
    const uc *text_end = base + valid;
    int last = final && valid == data.len;
    Ring ring = {0};
    while (p < text_end) {
        const uc *next = p;
        Py_ssize_t count;
        long long lines;
        Ahead *ahead = sp->lines != NULL && sp->line_seed_set ? ring_take(sp, &ring, p, text_end) : NULL;
        if (ahead != NULL && ahead->slot != NULL) {
            int settled;
            status = settle_line(sp, p, ahead->next, ahead->hash, ahead->slot, text_end, last, &settled);
            if (status != OK) break;
            if (settled && ahead->next - p > sp->max_record) {
                status = PUNT; /* the reference rejects the file (line_too_long) */
                break;
            }
            if (settled) {
                sp->settled++;
                sp->settled_by_line++;
                line += ahead->lines;
                p = ahead->next;
                continue;
            }
        }
        status = split_record(sp, p, text_end, last, &next, &count, &lines);
        if (status == SLOW) {
            /* incomplete: more data is read unless it is too long already */
            status = text_end - p > sp->max_record ? PUNT : OK;
            break;
        }
        if (status == OK && next - p > sp->max_record) status = PUNT;
        if (status != OK) break;
        long long first = line;
        const uc *record = p;
        line += lines;
        p = next;
        if (count == 0) continue; /* a blank line */
        const uc *record_text = next; /* without its line break */
        if (record_text > record && record_text[-1] == '\n') record_text--;
        if (record_text > record && record_text[-1] == '\r') record_text--;
        if (count != sp->columns) {
            WITH_GIL({
                PyObject *entry = Py_BuildValue(
                    "(LNs#)", first,
                    PyUnicode_FromFormat("expected %zd fields, found %zd", sp->columns, count),
                    (const char *)record, (Py_ssize_t)(record_text - record));
                if (entry == NULL || PyList_Append(malformed, entry) < 0) status = ERR;
                Py_XDECREF(entry);
            });
            if (status != OK) break;
            continue;
        }
        const uc *identity = (const uc *)sp->fields.data + sp->starts[sp->identity_index];
        Py_ssize_t identity_len = sp->lens[sp->identity_index];
        Py_ssize_t a, b;
        strip(identity, identity_len, &a, &b);
        const uc *ascii_key = NULL;
        uint64_t seen_key = 0; /* the Bloom filter's hash of the identity key */
        int bucket = -1;
        if (is_ascii(identity + a, b - a)) {
            sp->key.len = 0;
            if (buf_reserve(&sp->key, b - a + 1) < 0) {
                status = ERR;
                break;
            }
            lower_ascii(sp->key.data, sp->key.cap, identity + a, b - a);
            ascii_key = (const uc *)sp->key.data;
            seen_key = xxh64(ascii_key, (size_t)(b - a));
        } else {
            uint64_t key;
            WITH_GIL(status = identity_hash(sp, identity, identity_len, &key, &seen_key));
            if (status != OK) break;
            bucket = (int)(key % (uint64_t)sp->buckets);
        }
        /* The raw digest, for the index and for the next run's line index: of rows whose
         * identity C keys (settle_row's condition). */
        uc digest[8];
        int digested = ascii_key != NULL && sp->mapping != NULL && (sp->index != NULL || sp->recording) &&
                       !(sp->mapping->identity_kind == ID_EMAIL && b - a > 254);
        if (encode_fields(sp, count) != OK || (digested && row_digest(sp, digest) != OK)) {
            status = ERR;
            break;
        }
        if (digested && sp->recording && sp->line_seed_set) {
            uint64_t line_hash = xxh64_seeded(record, (size_t)(record_text - record), sp->line_seed);
            if ((status = record_line(sp, line_hash, digest, seen_key)) != OK) break;
        }
        if (bucket < 0) bucket = (int)(key_hash(ascii_key, b - a) % (uint64_t)sp->buckets);
        /* Only rows of buckets given an index can be settled; the Bloom filter, sized by
         * their digests, keeps only their keys (an identity has one bucket, so no row of
         * another is its duplicate). */
        if (sp->index != NULL && digested && sp->index[bucket].present && !seen_before(sp, seen_key)) {
            int settled, home = bucket;
            status = settle_row(sp, ascii_key, b - a, digest, record, record_text - record, &bucket, &settled);
            if (status != OK) break;
            if (settled) {
                sp->settled++;
                continue;
            }
            if (bucket < 0) bucket = home;
        }
        Buf *pending = &sp->pending[bucket];
        if ((pending->cap == 0 && small_reserve(pending, 0) < 0) ||
            put_work_line(sp, pending, first, count, record, record_text - record) != OK) {
            status = ERR;
            break;
        }
        sp->counts[bucket]++;
        sp->rows++;
        if (pending->len >= sp->ready_bytes) {
            WITH_GIL({
                PyObject *entry = Py_BuildValue("(iy#)", bucket, pending->data, pending->len);
                if (entry == NULL || PyList_Append(ready, entry) < 0) status = ERR;
                Py_XDECREF(entry);
            });
            if (status != OK) break;
            pending->len = 0;
        }
    }
#undef WITH_GIL
    PyEval_RestoreThread(released);
    if (status == ERR && !PyErr_Occurred()) PyErr_NoMemory();
    if (status == PUNT) result = Py_NewRef(Py_None);
    else if (status == OK)
        result = Py_BuildValue("(nLOOn)", (Py_ssize_t)(p - base), line, malformed, ready, bad);
done:
    Py_XDECREF(malformed);
    Py_XDECREF(ready);
    PyBuffer_Release(&data);
    return result;
}

/* limits(max_record, max_field): records (bytes, line breaks included) and fields longer
 * than these are left to the reference, which rejects the file (split.InputLimits). */
static PyObject *splitter_limits(Splitter *sp, PyObject *args) {
    Py_ssize_t max_record, max_field;
    if (!PyArg_ParseTuple(args, "nn", &max_record, &max_field)) return NULL;
    if (max_record < 1 || max_field < 1) {
        PyErr_SetString(PyExc_ValueError, "limits must be positive");
        return NULL;
    }
    sp->max_record = max_record;
    sp->max_field = max_field;
    Py_RETURN_NONE;
}

/* line_seed(header): the header line of the part split next (without its line break):
 * the hash of each row's line is seeded with its hash, so a line hashes alike only under
 * the same columns. */
static PyObject *splitter_line_seed(Splitter *sp, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    sp->line_seed = xxh64((const uc *)view.buf, (size_t)view.len);
    sp->line_seed_set = 1;
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* drain() -> [(bucket, work lines)] of every bucket still holding lines. */
static PyObject *splitter_drain(Splitter *sp, PyObject *unused) {
    PyObject *ready = PyList_New(0);
    for (int i = 0; ready && i < sp->buckets; i++) {
        Buf *pending = &sp->pending[i];
        if (pending->len == 0) continue;
        PyObject *entry = Py_BuildValue("(iy#)", i, pending->data, pending->len);
        if (entry == NULL || PyList_Append(ready, entry) < 0) Py_CLEAR(ready);
        Py_XDECREF(entry);
        pending->len = 0;
    }
    return ready;
}

static PyObject *splitter_counts(Splitter *sp, PyObject *unused) {
    PyObject *list = PyList_New(sp->buckets);
    for (int i = 0; list && i < sp->buckets; i++) {
        PyObject *n = PyLong_FromSsize_t(sp->counts[i]);
        if (n == NULL) Py_CLEAR(list);
        else PyList_SET_ITEM(list, i, n);
    }
    return list;
}

static PyMethodDef SPLITTER_METHODS[] = {
    {"feed", (PyCFunction)splitter_feed, METH_VARARGS,
     "feed(data, line, final) -> None or (consumed, line, malformed, ready, bad_utf8)"},
    {"drain", (PyCFunction)splitter_drain, METH_NOARGS, "drain() -> [(bucket, work lines)]"},
    {"limits", (PyCFunction)splitter_limits, METH_VARARGS,
     "limits(max_record, max_field): longer records and fields are left to the reference"},
    {"lines_begin", (PyCFunction)splitter_lines_begin, METH_O,
     "lines_begin(entries): the last run's line index entries come next (lines_add)"},
    {"lines_add", (PyCFunction)splitter_lines_add, METH_O,
     "lines_add(entries) -> entries taken: a chunk of the last run's line index"},
    {"record_lines", (PyCFunction)splitter_record_lines, METH_VARARGS,
     "record_lines(mapping, settled_too): keep this file's lines for the next run (take_lines)"},
    {"take_lines", (PyCFunction)splitter_take_lines, METH_NOARGS,
     "take_lines() -> bytes: line index entries (line hash, raw digest, identity key)"},
    {"line_seed", (PyCFunction)splitter_line_seed, METH_O,
     "line_seed(header line): what the next part's line hashes are seeded with"},
    {"counts", (PyCFunction)splitter_counts, METH_NOARGS, "counts() -> rows per bucket"},
    {"use_index", (PyCFunction)splitter_use_index, METH_VARARGS,
     "use_index(mapping, digests, lines): settle rows acknowledged before exactly as they are"},
    {"excluded", (PyCFunction)splitter_excluded, METH_NOARGS,
     "excluded() -> [(reason, record text)]: settled rows kept back since the last call"},
    {"settled", (PyCFunction)splitter_settled, METH_NOARGS,
     "settled() -> per bucket None or (digests, withheld digests, unchanged, suppressed reasons)"},
    {NULL, NULL, 0, NULL},
};

static PyObject *splitter_get_rows(Splitter *sp, void *closure) { return PyLong_FromSsize_t(sp->rows); }
static PyObject *splitter_get_settled(Splitter *sp, void *closure) { return PyLong_FromSsize_t(sp->settled); }
static PyObject *splitter_get_settled_by_line(Splitter *sp, void *closure) {
    return PyLong_FromSsize_t(sp->settled_by_line);
}

static PyGetSetDef SPLITTER_GETSET[] = {
    {"rows", (getter)splitter_get_rows, NULL, "rows split so far", NULL},
    {"settled_rows", (getter)splitter_get_settled, NULL, "rows settled so far (use_index)", NULL},
    {"settled_by_line", (getter)splitter_get_settled_by_line, NULL,
     "rows of settled_rows settled from their line's hash (not parsed)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SplitterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "switchboard_sync.Splitter",
    .tp_basicsize = sizeof(Splitter),
    .tp_dealloc = (destructor)splitter_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = splitter_new,
    .tp_methods = SPLITTER_METHODS,
    .tp_getset = SPLITTER_GETSET,
    .tp_doc = "A CSV file's rows into identity buckets as work lines (see core/sync/split.py).",
};

/* ---- helpers the tests compare with the reference ------------------------------------------ */

static PyObject *blake2b_digest(PyObject *module, PyObject *args) {
    Py_buffer view;
    Py_ssize_t size;
    if (!PyArg_ParseTuple(args, "y*n", &view, &size)) return NULL;
    if (size < 1 || size > 64) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "digest size is 1 to 64");
        return NULL;
    }
    Blake2b s;
    uc out[64];
    b2_init(&s, (size_t)size);
    b2_update(&s, view.buf, (size_t)view.len);
    b2_final(&s, out);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, size);
}

/* typed(kind, limit, text) -> (json, hash, text or None), or None where C leaves the value
 * to the reference's coercer. */
static PyObject *typed_value(PyObject *module, PyObject *args) {
    FieldSpec f = {0};
    const char *text;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "ins#", &f.kind, &f.limit, &text, &n)) return NULL;
    Buf typed = {0};
    Typed t = {0};
    PyObject *result = NULL;
    int status = fast_value(&f, (const uc *)text, n, &typed, &t);
    if (status == SLOW) {
        result = Py_NewRef(Py_None);
    } else if (status == OK) {
        PyObject *string = Py_None;
        if (t.text_len || f.kind == K_STRING || f.kind == K_EMAIL)
            string = PyUnicode_DecodeUTF8(typed.data + t.text, t.text_len, "strict");
        if (string != NULL)
            result = Py_BuildValue("(y#y#O)", typed.data + t.json, t.json_len, t.hash, (Py_ssize_t)8, string);
        if (string != Py_None) Py_XDECREF(string);
    }
    PyMem_RawFree(typed.data);
    return result;
}

static PyObject *xxh64_digest(PyObject *module, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    uint64_t h = xxh64(view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    uc out[8];
    for (int i = 0; i < 8; i++) out[i] = (uc)(h >> (56 - 8 * i));
    return PyBytes_FromStringAndSize((const char *)out, 8);
}

/* tune_allocator(mmap_threshold, trim_threshold) -> bool: pin glibc's thresholds, unless
 * the environment sets them (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) or this is not
 * glibc. Left dynamic, the mmap threshold rises to the largest block freed (a bucket's work
 * lines, 6 MB at 5M rows), after which buffers that size come from the heap and stay with
 * the process once freed; a fixed threshold also fixes the trim threshold, which must not
 * stay at its 128 KB default (the heap's top would be given back and taken again). */
static PyObject *tune_allocator(PyObject *module, PyObject *args) {
    int mmap_threshold, trim_threshold;
    if (!PyArg_ParseTuple(args, "ii", &mmap_threshold, &trim_threshold)) return NULL;
#ifdef __GLIBC__
    if (getenv("MALLOC_MMAP_THRESHOLD_") == NULL && getenv("MALLOC_TRIM_THRESHOLD_") == NULL &&
        mallopt(M_MMAP_THRESHOLD, mmap_threshold) == 1 && mallopt(M_TRIM_THRESHOLD, trim_threshold) == 1)
        Py_RETURN_TRUE;
#endif
    Py_RETURN_FALSE;
}

/* release_freed() -> bool: give the pages freed inside glibc's heaps back (malloc_trim),
 * those of threads' arenas too: what threads read and let go of (a sync's digest indexes)
 * stays resident otherwise, below the top of their heap. */
static PyObject *release_freed(PyObject *module, PyObject *unused) {
#ifdef __GLIBC__
    int released;
    Py_BEGIN_ALLOW_THREADS
    released = malloc_trim(0);
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(released);
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef METHODS[] = {
    {"tune_allocator", tune_allocator, METH_VARARGS,
     "tune_allocator(mmap_threshold, trim_threshold) -> whether glibc's were set"},
    {"release_freed", release_freed, METH_NOARGS,
     "release_freed() -> whether glibc gave freed heap pages back"},
    {"blake2b", blake2b_digest, METH_VARARGS, "blake2b(data, digest_size) -> digest"},
    {"xxh64", xxh64_digest, METH_O, "xxh64(data) -> digest, as xxhash.xxh64_digest"},
    {"typed", typed_value, METH_VARARGS, "typed(kind, limit, text) -> (json, hash, text) or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, "switchboard_sync",
    "A segment sync's buckets in C (the reference is core/sync/engine.py).", -1, METHODS,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_switchboard_sync(void) {
    if (PyType_Ready(&MappingType) < 0 || PyType_Ready(&StateType) < 0 ||
        PyType_Ready(&SplitterType) < 0)
        return NULL;
    PyObject *module = PyModule_Create(&MODULE);
    if (module == NULL) return NULL;
    if (PyModule_AddObjectRef(module, "Mapping", (PyObject *)&MappingType) < 0 ||
        PyModule_AddObjectRef(module, "State", (PyObject *)&StateType) < 0 ||
        PyModule_AddObjectRef(module, "Splitter", (PyObject *)&SplitterType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
