/*
 * switchboard_speedups: the log export's broadLog and trackingLog records, in C.
 *
 * Reads a segment's stored events (JSON Lines) and writes their records as JSON Lines. The
 * reference is core/export/xdm.py (orjson.loads, broadlog_record / trackinglog_record,
 * orjson.dumps); this module gives the very same bytes several times faster, so a window's
 * export costs little more than reading its events. Anything unusual in a line (a value of
 * an unexpected type, a timestamp outside 1970-9999, JSON this strict parser does not
 * take) goes to the reference for that one line, so both paths always agree: the tests
 * compare them byte for byte.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>
#include <math.h>

#include "shared.h"

/* A code point as UTF-8 at `out`; returns the end. */
static char *put_utf8(char *out, unsigned cp) {
    if (cp < 0x80) {
        *out++ = (char)cp;
    } else if (cp < 0x800) {
        *out++ = (char)(0xc0 | cp >> 6);
        *out++ = (char)(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
        *out++ = (char)(0xe0 | cp >> 12);
        *out++ = (char)(0x80 | (cp >> 6 & 0x3f));
        *out++ = (char)(0x80 | (cp & 0x3f));
    } else {
        *out++ = (char)(0xf0 | cp >> 18);
        *out++ = (char)(0x80 | (cp >> 12 & 0x3f));
        *out++ = (char)(0x80 | (cp >> 6 & 0x3f));
        *out++ = (char)(0x80 | (cp & 0x3f));
    }
    return out;
}

/* ---- outcomes ------------------------------------------------------------------------- */

#define DONE 0
#define FAILED -1   /* a Python exception is set */
#define REFERENCE 1 /* unusual input: the reference writes this line */

#define CHECK(expr)                                      \
    do {                                                 \
        int check_status_ = (expr);                      \
        if (check_status_ != DONE) return check_status_; \
    } while (0)
#define CHECK_PUT(expr)                \
    do {                               \
        if ((expr) < 0) return FAILED; \
    } while (0)

/* sha256 of `{log}|{event_id}` as a JSON string: xdm.record_id. */
static int put_record_id(Buf *b, const char *log, const char *event_id, Py_ssize_t n) {
    Sha256 h;
    sha256_init(&h);
    sha256_update(&h, (const unsigned char *)log, strlen(log));
    sha256_update(&h, (const unsigned char *)"|", 1);
    sha256_update(&h, (const unsigned char *)event_id, (size_t)n);
    char hex[66];
    hex[0] = '"';
    sha256_hex(&h, hex + 1);
    hex[65] = '"';
    return buf_put(b, hex, 66);
}

/* ---- xdm.iso: epoch milliseconds as `YYYY-MM-DDTHH:MM:SS.mmmZ` -------------------------- */

#define LAST_SECOND_OF_9999 253402300799LL

static void put_digits(char *out, long long value, int width) {
    for (int i = width - 1; i >= 0; i--) {
        out[i] = (char)('0' + value % 10);
        value /= 10;
    }
}

/* REFERENCE outside 1970-01-01 .. 9999-12-31 (the reference's strftime decides there). */
static int put_iso(Buf *b, long long millis) {
    if (millis < 0 || millis / 1000 > LAST_SECOND_OF_9999) return REFERENCE;
    long long seconds = millis / 1000;
    long long days = seconds / 86400, rest = seconds % 86400;
    /* The civil date of a day count from 1970-01-01 (H. Hinnant's algorithm). */
    long long z = days + 719468;
    long long era = z / 146097;
    long long doe = z - era * 146097;
    long long yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    long long doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    long long mp = (5 * doy + 2) / 153;
    long long day = doy - (153 * mp + 2) / 5 + 1;
    long long month = mp < 10 ? mp + 3 : mp - 9;
    long long year = yoe + era * 400 + (month <= 2);
    char text[26] = "\"0000-00-00T00:00:00.000Z\"";
    put_digits(text + 1, year, 4);
    put_digits(text + 6, month, 2);
    put_digits(text + 9, day, 2);
    put_digits(text + 12, rest / 3600, 2);
    put_digits(text + 15, rest % 3600 / 60, 2);
    put_digits(text + 18, rest % 60, 2);
    put_digits(text + 21, millis % 1000, 3);
    return buf_put(b, text, 26) < 0 ? FAILED : DONE;
}


/* ---- xdm.failure_code, for ASCII text (other text asks the reference) ------------------- */

static int is_word(unsigned char c) {
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
           c == '_';
}

static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static int is_space(unsigned char c) { return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f); }

static int is_class(unsigned char c) { return c == '2' || c == '4' || c == '5'; }

/* `\b([245]\.\d{1,3}\.\d{1,3})\b`, the leftmost match, or `^\s*([245]\d\d)\b`. */
static int smtp_code(const unsigned char *s, Py_ssize_t n, Py_ssize_t *start, Py_ssize_t *end) {
    for (Py_ssize_t i = 0; i < n; i++) {
        if (!is_class(s[i]) || (i > 0 && is_word(s[i - 1]))) continue;
        Py_ssize_t j = i + 1;
        if (j >= n || s[j] != '.') continue;
        Py_ssize_t run = 0;
        for (j++; j < n && is_digit(s[j]); j++) run++;
        if (run < 1 || run > 3 || j >= n || s[j] != '.') continue;
        run = 0;
        for (j++; j < n && is_digit(s[j]); j++) run++;
        if (run < 1 || run > 3 || (j < n && is_word(s[j]))) continue;
        *start = i;
        *end = j;
        return 1;
    }
    Py_ssize_t w = 0;
    while (w < n && is_space(s[w])) w++;
    if (w + 3 <= n && is_class(s[w]) && is_digit(s[w + 1]) && is_digit(s[w + 2]) &&
        (w + 3 == n || !is_word(s[w + 3]))) {
        *start = w;
        *end = w + 3;
        return 1;
    }
    return 0;
}


/* ---- one stored event, parsed --------------------------------------------------------- */

typedef enum { ABSENT = 0, JNULL, JSTRING, JTRUE, JFALSE, JINT, JOBJECT, JOTHER } Kind;

typedef struct {
    Kind kind;
    const char *text; /* JSTRING: the decoded UTF-8 (in the line, or in the scratch buffer) */
    Py_ssize_t len;
    int ascii;
    long long number; /* JINT */
} Field;

enum {
    EVENT_ID, SOURCE, SOURCE_TYPE, TYPE, CHANNEL, OCCURRED_AT, EXTERNAL_ID, EMAIL, PHONE,
    CAMPAIGN_ID, CAMPAIGN_NAME, CANVAS_ID, CANVAS_NAME, SEND_ID, DISPATCH_ID, URL,
    BOUNCE_REASON, PUSH_TOKEN, RAW, N_FIELDS
};
static const char *const FIELD_NAMES[N_FIELDS] = {
    "event_id", "source", "source_type", "type", "channel", "occurred_at", "external_id",
    "email", "phone", "campaign_id", "campaign_name", "canvas_id", "canvas_name", "send_id",
    "dispatch_id", "url", "bounce_reason", "push_token", "raw"};
enum { RAW_ERROR, RAW_MACHINE_OPEN, RAW_BOT_CLICK, N_RAW };
static const char *const RAW_NAMES[N_RAW] = {"error", "machine_open", "is_suspected_bot_click"};

typedef struct {
    Field field[N_FIELDS];
    Field raw[N_RAW];
} Event;

/* ---- a strict JSON parser for one line ------------------------------------------------- */
/* It takes what orjson takes, or less (then the reference decides): RFC 8259 JSON, valid
 * UTF-8, no lone surrogates, at most 128 levels deep. */

#define MAX_DEPTH 128

typedef struct {
    const unsigned char *p, *end;
    char *scratch; /* room for the line's decoded strings (never more than the line) */
    Py_ssize_t used;
    int depth;
} Parser;

static void skip_ws(Parser *ps) {
    while (ps->p < ps->end && (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\n' || *ps->p == '\r'))
        ps->p++;
}

static int hex_value(unsigned char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int read_hex4(Parser *ps, unsigned *value) {
    if (ps->end - ps->p < 4) return REFERENCE;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hex_value(ps->p[i]);
        if (h < 0) return REFERENCE;
        v = v << 4 | (unsigned)h;
    }
    ps->p += 4;
    *value = v;
    return DONE;
}

/* Length of the valid UTF-8 sequence at p (lead byte >= 0x80), or 0. */
static int utf8_sequence(const unsigned char *p, const unsigned char *end) {
    unsigned char c = p[0];
    int n;
    unsigned min, cp;
    if (c >= 0xc2 && c <= 0xdf) { n = 2; cp = c & 0x1f; min = 0x80; }
    else if (c >= 0xe0 && c <= 0xef) { n = 3; cp = c & 0x0f; min = 0x800; }
    else if (c >= 0xf0 && c <= 0xf4) { n = 4; cp = c & 0x07; min = 0x10000; }
    else return 0;
    if (end - p < n) return 0;
    for (int i = 1; i < n; i++) {
        if ((p[i] & 0xc0) != 0x80) return 0;
        cp = cp << 6 | (p[i] & 0x3f);
    }
    if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) return 0;
    return n;
}

/* A string (ps->p after its opening quote); its decoded text into `out` if not NULL. */
static int parse_string(Parser *ps, Field *out) {
    const unsigned char *start = ps->p;
    int ascii = 1;
    while (ps->p < ps->end) {
        unsigned char c = *ps->p;
        if (c == '"') {
            if (out) {
                out->kind = JSTRING;
                out->text = (const char *)start;
                out->len = ps->p - start;
                out->ascii = ascii;
            }
            ps->p++;
            return DONE;
        }
        if (c == '\\') break;
        if (c < 0x20) return REFERENCE;
        if (c < 0x80) {
            ps->p++;
            continue;
        }
        int n = utf8_sequence(ps->p, ps->end);
        if (n == 0) return REFERENCE;
        ascii = 0;
        ps->p += n;
    }
    if (ps->p >= ps->end) return REFERENCE;
    /* Escapes: decode into the scratch buffer. */
    char *begin = ps->scratch + ps->used, *w = begin;
    memcpy(w, start, (size_t)(ps->p - start));
    w += ps->p - start;
    while (ps->p < ps->end) {
        unsigned char c = *ps->p;
        if (c == '"') {
            ps->p++;
            if (out) {
                out->kind = JSTRING;
                out->text = begin;
                out->len = w - begin;
                out->ascii = ascii;
            }
            ps->used += w - begin;
            return DONE;
        }
        if (c < 0x20) return REFERENCE;
        if (c >= 0x80) {
            int n = utf8_sequence(ps->p, ps->end);
            if (n == 0) return REFERENCE;
            memcpy(w, ps->p, (size_t)n);
            w += n;
            ps->p += n;
            ascii = 0;
            continue;
        }
        if (c != '\\') {
            *w++ = (char)c;
            ps->p++;
            continue;
        }
        ps->p++;
        if (ps->p >= ps->end) return REFERENCE;
        unsigned char e = *ps->p++;
        switch (e) {
        case '"': *w++ = '"'; break;
        case '\\': *w++ = '\\'; break;
        case '/': *w++ = '/'; break;
        case 'b': *w++ = '\b'; break;
        case 'f': *w++ = '\f'; break;
        case 'n': *w++ = '\n'; break;
        case 'r': *w++ = '\r'; break;
        case 't': *w++ = '\t'; break;
        case 'u': {
            unsigned cp, low;
            CHECK(read_hex4(ps, &cp));
            if (cp >= 0xdc00 && cp <= 0xdfff) return REFERENCE;
            if (cp >= 0xd800 && cp <= 0xdbff) {
                if (ps->end - ps->p < 6 || ps->p[0] != '\\' || ps->p[1] != 'u') return REFERENCE;
                ps->p += 2;
                CHECK(read_hex4(ps, &low));
                if (low < 0xdc00 || low > 0xdfff) return REFERENCE;
                cp = 0x10000 + ((cp - 0xd800) << 10) + (low - 0xdc00);
            }
            if (cp >= 0x80) ascii = 0;
            w = put_utf8(w, cp);
            break;
        }
        default:
            return REFERENCE;
        }
    }
    return REFERENCE;
}

static int parse_number(Parser *ps, Field *out) {
    const unsigned char *start = ps->p;
    int negative = 0, integral = 1;
    if (ps->p < ps->end && *ps->p == '-') {
        negative = 1;
        ps->p++;
    }
    if (ps->p >= ps->end || !is_digit(*ps->p)) return REFERENCE;
    if (*ps->p == '0') ps->p++;
    else while (ps->p < ps->end && is_digit(*ps->p)) ps->p++;
    const unsigned char *digits_end = ps->p;
    if (ps->p < ps->end && *ps->p == '.') {
        integral = 0;
        ps->p++;
        if (ps->p >= ps->end || !is_digit(*ps->p)) return REFERENCE;
        while (ps->p < ps->end && is_digit(*ps->p)) ps->p++;
    }
    if (ps->p < ps->end && (*ps->p == 'e' || *ps->p == 'E')) {
        integral = 0;
        ps->p++;
        if (ps->p < ps->end && (*ps->p == '+' || *ps->p == '-')) ps->p++;
        if (ps->p >= ps->end || !is_digit(*ps->p)) return REFERENCE;
        while (ps->p < ps->end && is_digit(*ps->p)) ps->p++;
    }
    const unsigned char *d = start + negative;
    if (integral && digits_end - d <= 18) {
        if (out) {
            long long v = 0;
            for (; d < digits_end; d++) v = v * 10 + (*d - '0');
            out->kind = JINT;
            out->number = negative ? -v : v;
        }
        return DONE;
    }
    /* orjson reads any other number as a double and refuses one that overflows to
     * infinity (`1e309`, 400 digits): so does this parser. */
    Py_ssize_t n = ps->p - start;
    char local[64], *text = n < (Py_ssize_t)sizeof local ? local : PyMem_Malloc((size_t)n + 1);
    if (text == NULL) return REFERENCE;
    memcpy(text, start, (size_t)n);
    text[n] = '\0';
    double value = PyOS_string_to_double(text, NULL, NULL);
    if (text != local) PyMem_Free(text);
    if (value == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return REFERENCE;
    }
    if (isinf(value)) return REFERENCE;
    if (out) out->kind = JOTHER;
    return DONE;
}

static int parse_value(Parser *ps, Field *out);

static int field_index(const char *const *names, int count, const Field *key) {
    for (int i = 0; i < count; i++) {
        /* The first byte first: strlen is the dearer test. */
        if (key->len > 0 && names[i][0] == key->text[0] && (Py_ssize_t)strlen(names[i]) == key->len &&
            memcmp(names[i], key->text, (size_t)key->len) == 0)
            return i;
    }
    return -1;
}

/* Which members of an object to keep: `names[i]` into `fields[i]`; the member `nested`
 * (-1: none), when its value is an object, has its own members kept by `inner`. */
typedef struct Members {
    const char *const *names;
    int count;
    Field *fields;
    int nested;
    const struct Members *inner;
} Members;

/* After an element of an object or array: `,` (*more) or the closing bracket. */
static int after_item(Parser *ps, unsigned char close, int *more) {
    skip_ws(ps);
    if (ps->p >= ps->end) return REFERENCE;
    *more = *ps->p == ',';
    if (!*more && *ps->p != close) return REFERENCE;
    ps->p++;
    if (!*more) ps->depth--;
    return DONE;
}

/* Into an object or array (ps->p after its opening bracket); *empty if it closes at once. */
static int enter(Parser *ps, unsigned char close, int *empty) {
    if (++ps->depth > MAX_DEPTH) return REFERENCE;
    skip_ws(ps);
    *empty = ps->p < ps->end && *ps->p == close;
    if (*empty) {
        ps->p++;
        ps->depth--;
    }
    return DONE;
}

/* An object (ps->p after `{`); `keep` (may be NULL) names the members to keep; a repeated
 * member: the last one wins, as in orjson. */
static int parse_object(Parser *ps, const Members *keep) {
    int empty, more = 1;
    CHECK(enter(ps, '}', &empty));
    if (empty) return DONE;
    while (more) {
        skip_ws(ps);
        if (ps->p >= ps->end || *ps->p != '"') return REFERENCE;
        ps->p++;
        Field key;
        CHECK(parse_string(ps, &key));
        int index = keep ? field_index(keep->names, keep->count, &key) : -1;
        skip_ws(ps);
        if (ps->p >= ps->end || *ps->p != ':') return REFERENCE;
        ps->p++;
        skip_ws(ps);
        if (index >= 0 && index == keep->nested) {
            memset(keep->inner->fields, 0, sizeof(Field) * (size_t)keep->inner->count);
            if (ps->p < ps->end && *ps->p == '{') {
                ps->p++;
                keep->fields[index].kind = JOBJECT;
                CHECK(parse_object(ps, keep->inner));
                CHECK(after_item(ps, '}', &more));
                continue;
            }
        }
        Field value = {0};
        CHECK(parse_value(ps, index >= 0 ? &value : NULL));
        if (index >= 0) keep->fields[index] = value;
        CHECK(after_item(ps, '}', &more));
    }
    return DONE;
}

static int parse_array(Parser *ps) {
    int empty, more = 1;
    CHECK(enter(ps, ']', &empty));
    if (empty) return DONE;
    while (more) {
        skip_ws(ps);
        CHECK(parse_value(ps, NULL));
        CHECK(after_item(ps, ']', &more));
    }
    return DONE;
}

static int literal(Parser *ps, const char *word, Kind kind, Field *out) {
    size_t n = strlen(word);
    if ((size_t)(ps->end - ps->p) < n || memcmp(ps->p, word, n) != 0) return REFERENCE;
    ps->p += n;
    if (out) out->kind = kind;
    return DONE;
}

/* Any value; `out` (if not NULL) learns its kind, and its text or number. */
static int parse_value(Parser *ps, Field *out) {
    if (ps->p >= ps->end) return REFERENCE;
    switch (*ps->p) {
    case '"':
        ps->p++;
        return parse_string(ps, out);
    case '{':
        ps->p++;
        if (out) out->kind = JOBJECT;
        return parse_object(ps, NULL);
    case '[':
        ps->p++;
        if (out) out->kind = JOTHER;
        return parse_array(ps);
    case 't': return literal(ps, "true", JTRUE, out);
    case 'f': return literal(ps, "false", JFALSE, out);
    case 'n': return literal(ps, "null", JNULL, out);
    default: return parse_number(ps, out);
    }
}

/* A whole line: one JSON object and nothing else. `raw`'s three fields are kept too. */
static int parse_event(Parser *ps, Event *ev) {
    memset(ev, 0, sizeof *ev);
    const Members raw = {RAW_NAMES, N_RAW, ev->raw, -1, NULL};
    const Members event = {FIELD_NAMES, N_FIELDS, ev->field, RAW, &raw};
    skip_ws(ps);
    if (ps->p >= ps->end || *ps->p != '{') return REFERENCE;
    ps->p++;
    ps->depth = 0;
    CHECK(parse_object(ps, &event));
    skip_ws(ps);
    return ps->p == ps->end ? DONE : REFERENCE;
}

/* ---- the lookup tables, from the reference's dicts ------------------------------------ */

typedef struct {
    const char *key, *value, *extra; /* extra: DELIVERY_OUTCOMES' failure type, or NULL */
    Py_ssize_t key_len, value_len, extra_len;
} Entry;

#define MAX_ENTRIES 64

typedef struct {
    Entry entry[MAX_ENTRIES];
    int count;
} Table;

static int utf8_of(PyObject *text, const char **s, Py_ssize_t *n) {
    if (!PyUnicode_Check(text)) {
        PyErr_SetString(PyExc_TypeError, "table keys and values must be str");
        return -1;
    }
    *s = PyUnicode_AsUTF8AndSize(text, n);
    return *s == NULL ? -1 : 0;
}

/* A dict str -> str, or str -> (str, str | None), or a set of str (no values). */
static int load_table(PyObject *source, Table *table) {
    table->count = 0;
    if (PyAnySet_Check(source)) {
        PyObject *iterator = PyObject_GetIter(source), *item;
        if (iterator == NULL) return -1;
        while ((item = PyIter_Next(iterator)) != NULL) {
            Entry *e = &table->entry[table->count];
            int failed = table->count >= MAX_ENTRIES || utf8_of(item, &e->key, &e->key_len) < 0;
            Py_DECREF(item); /* the set keeps it alive */
            if (failed) {
                Py_DECREF(iterator);
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "table too large");
                return -1;
            }
            e->value = e->extra = NULL;
            table->count++;
        }
        Py_DECREF(iterator);
        return PyErr_Occurred() ? -1 : 0;
    }
    PyObject *key, *value;
    Py_ssize_t position = 0;
    while (PyDict_Next(source, &position, &key, &value)) {
        if (table->count >= MAX_ENTRIES) {
            PyErr_SetString(PyExc_ValueError, "table too large");
            return -1;
        }
        Entry *e = &table->entry[table->count++];
        e->extra = NULL;
        if (utf8_of(key, &e->key, &e->key_len) < 0) return -1;
        if (PyTuple_Check(value) && PyTuple_GET_SIZE(value) == 2) {
            if (utf8_of(PyTuple_GET_ITEM(value, 0), &e->value, &e->value_len) < 0) return -1;
            PyObject *extra = PyTuple_GET_ITEM(value, 1);
            if (extra != Py_None && utf8_of(extra, &e->extra, &e->extra_len) < 0) return -1;
        } else if (utf8_of(value, &e->value, &e->value_len) < 0) {
            return -1;
        }
    }
    return 0;
}

static const Entry *lookup(const Table *table, const char *key, Py_ssize_t n) {
    for (int i = 0; i < table->count; i++) {
        const Entry *e = &table->entry[i];
        if (e->key_len == n && memcmp(e->key, key, (size_t)n) == 0) return e;
    }
    return NULL;
}

static int text_is(const Field *f, const char *word) {
    size_t n = strlen(word);
    return f->kind == JSTRING && (size_t)f->len == n && memcmp(f->text, word, n) == 0;
}

/* ---- the records ---------------------------------------------------------------------- */

typedef struct {
    Table outcomes, interactions, email_delivery, email_tracking, channel_uris, notable;
    Table address_fields;     /* quarantine.ADDRESS_FIELDS: channel -> the address's field */
    PyObject *with_errors;    /* frozenset of `{channel}|{address key}`, or None */
    PyObject *delivery_matters; /* line -> bool, for addresses that are not ASCII text */
    PyObject *failure_code; /* xdm.failure_code, for text that is not ASCII */
    const char *namespace, *tenant_key, *ingested_at;
    Py_ssize_t namespace_len, tenant_key_len, ingested_at_len;
} Context;

/* Python truthiness of a field the reference reads as text: REFERENCE for other types. */
static int text_truth(const Field *f, int *truthy) {
    if (f->kind == ABSENT || f->kind == JNULL) {
        *truthy = 0;
        return DONE;
    }
    if (f->kind != JSTRING) return REFERENCE;
    *truthy = f->len > 0;
    return DONE;
}

static int put_text_or_null(Buf *b, const Field *f) {
    if (f->kind == JNULL) return PUT(b, "null") < 0 ? FAILED : DONE;
    if (f->kind != JSTRING) return REFERENCE;
    return put_json_bytes(b, f->text, f->len) < 0 ? FAILED : DONE;
}

static int put_member_key(Buf *b, int *first, const char *key, Py_ssize_t key_len,
                          const Field *value) {
    if (!*first && PUT(b, ",") < 0) return FAILED;
    *first = 0;
    if (buf_put(b, key, key_len) < 0) return FAILED;
    return put_text_or_null(b, value);
}

#define put_member(b, first, key, value) \
    put_member_key((b), (first), (key), (Py_ssize_t)(sizeof(key) - 1), (value))

/* `event.get(a) or event.get(b)`, left out when None (xdm._campaign) */
static int first_given(const Event *ev, int a, int b, const Field **found) {
    int truthy;
    CHECK(text_truth(&ev->field[a], &truthy));
    const Field *value = truthy ? &ev->field[a] : &ev->field[b];
    if (value->kind == ABSENT || value->kind == JNULL) value = NULL;
    else if (value->kind != JSTRING) return REFERENCE;
    *found = value;
    return DONE;
}

/* xdm.identity_map */
static int put_identity_map(Buf *b, const Context *c, const Event *ev) {
    static const int fields[3] = {EXTERNAL_ID, EMAIL, PHONE};
    int primary_taken = 0;
    CHECK_PUT(PUT(b, "{"));
    for (int i = 0; i < 3; i++) {
        const Field *value = &ev->field[fields[i]];
        int truthy;
        CHECK(text_truth(value, &truthy));
        if (!truthy) continue;
        if (primary_taken) CHECK_PUT(PUT(b, ","));
        if (i == 0) CHECK_PUT(put_json_bytes(b, c->namespace, c->namespace_len));
        else CHECK_PUT(i == 1 ? PUT(b, "\"Email\"") : PUT(b, "\"Phone\""));
        CHECK_PUT(PUT(b, ":[{\"id\":"));
        CHECK_PUT(put_json_bytes(b, value->text, value->len));
        CHECK_PUT(primary_taken ? PUT(b, ",\"primary\":false}]") : PUT(b, ",\"primary\":true}]"));
        primary_taken = 1;
    }
    CHECK_PUT(PUT(b, "}"));
    return DONE;
}

/* `{"_id":..,"timestamp":..,"eventType":..,"identityMap":..,"_experience":{"customerJourneyManagement":{` */
static int put_head(Buf *b, const Context *c, const Event *ev, const char *log,
                    const char *event_type, Py_ssize_t event_type_len) {
    const Field *event_id = &ev->field[EVENT_ID], *moment = &ev->field[OCCURRED_AT];
    if (event_id->kind != JSTRING || moment->kind != JINT) return REFERENCE;
    CHECK_PUT(PUT(b, "{\"_id\":"));
    CHECK_PUT(put_record_id(b, log, event_id->text, event_id->len));
    CHECK_PUT(PUT(b, ",\"timestamp\":"));
    CHECK(put_iso(b, moment->number));
    CHECK_PUT(PUT(b, ",\"eventType\":"));
    CHECK_PUT(put_json_bytes(b, event_type, event_type_len));
    CHECK_PUT(PUT(b, ",\"identityMap\":"));
    CHECK(put_identity_map(b, c, ev));
    CHECK_PUT(PUT(b, ",\"_experience\":{\"customerJourneyManagement\":{"));
    return DONE;
}

/* `,"messageProfile":{..}},"campaign":{` and xdm._campaign's fields */
static int put_profile_and_campaign(Buf *b, const Context *c, const Event *ev, int *first) {
    const Field *channel = &ev->field[CHANNEL];
    const Entry *uri = lookup(&c->channel_uris, channel->text, channel->len);
    CHECK_PUT(PUT(b, ",\"messageProfile\":{\"channel\":{\"_id\":"));
    CHECK_PUT(uri ? put_json_bytes(b, uri->value, uri->value_len)
                  : put_json_bytes(b, channel->text, channel->len));
    CHECK_PUT(PUT(b, "}}},\"campaign\":{"));
    const Field *delivery, *campaign, *name, *external_id = &ev->field[EXTERNAL_ID];
    CHECK(first_given(ev, DISPATCH_ID, SEND_ID, &delivery));
    CHECK(first_given(ev, CAMPAIGN_ID, CANVAS_ID, &campaign));
    CHECK(first_given(ev, CAMPAIGN_NAME, CANVAS_NAME, &name));
    if (delivery) CHECK(put_member(b, first, "\"deliveryID\":", delivery));
    if (campaign) CHECK(put_member(b, first, "\"campaignID\":", campaign));
    if (name) CHECK(put_member(b, first, "\"campaignName\":", name));
    if (external_id->kind != ABSENT && external_id->kind != JNULL)
        CHECK(put_member(b, first, "\"externalID\":", external_id));
    return put_member(b, first, "\"channel\":", channel);
}

/* `},"_<tenant>":{"hub":{..}}}` and the newline (xdm._hub) */
static int put_tail(Buf *b, const Context *c, const Event *ev) {
    if (ev->field[SOURCE].kind == ABSENT || ev->field[SOURCE_TYPE].kind == ABSENT)
        return REFERENCE; /* a KeyError there */
    CHECK_PUT(PUT(b, "}},"));
    CHECK_PUT(put_json_bytes(b, c->tenant_key, c->tenant_key_len));
    CHECK_PUT(PUT(b, ":{\"hub\":{\"sourceSystem\":"));
    CHECK(put_text_or_null(b, &ev->field[SOURCE]));
    CHECK_PUT(PUT(b, ",\"sourceEventId\":"));
    CHECK(put_text_or_null(b, &ev->field[EVENT_ID]));
    CHECK_PUT(PUT(b, ",\"sourceType\":"));
    CHECK(put_text_or_null(b, &ev->field[SOURCE_TYPE]));
    CHECK_PUT(PUT(b, ",\"ingestedAt\":"));
    CHECK_PUT(put_json_bytes(b, c->ingested_at, c->ingested_at_len));
    CHECK_PUT(PUT(b, "}}}\n"));
    return DONE;
}

/* bounce_reason, else raw.error, else none */
static int failure_reason(const Event *ev, const Field **reason) {
    int truthy;
    CHECK(text_truth(&ev->field[BOUNCE_REASON], &truthy));
    *reason = NULL;
    if (truthy) {
        *reason = &ev->field[BOUNCE_REASON];
        return DONE;
    }
    if (ev->field[RAW].kind != JOBJECT) return DONE; /* xdm._raw: anything else is none */
    CHECK(text_truth(&ev->raw[RAW_ERROR], &truthy));
    if (truthy) *reason = &ev->raw[RAW_ERROR];
    return DONE;
}

/* Bytes of the first 500 code points (`reason[:500]`) */
static Py_ssize_t reason_bytes(const Field *reason) {
    if (reason->ascii) return reason->len < 500 ? reason->len : 500;
    Py_ssize_t i = 0;
    for (int points = 0; i < reason->len && points < 500; points++) {
        unsigned char lead = (unsigned char)reason->text[i];
        i += lead < 0x80 ? 1 : lead < 0xe0 ? 2 : lead < 0xf0 ? 3 : 4;
    }
    return i;
}

static int put_code(Buf *b, const Context *c, const Field *reason) {
    if (reason->ascii) {
        Py_ssize_t start, end;
        if (!smtp_code((const unsigned char *)reason->text, reason->len, &start, &end)) return DONE;
        CHECK_PUT(PUT(b, ",\"code\":"));
        CHECK_PUT(put_json_bytes(b, reason->text + start, end - start));
        return DONE;
    }
    PyObject *text = PyUnicode_DecodeUTF8(reason->text, reason->len, "strict");
    if (text == NULL) return FAILED;
    PyObject *code = PyObject_CallOneArg(c->failure_code, text);
    Py_DECREF(text);
    if (code == NULL) return FAILED;
    int status = DONE;
    if (code != Py_None) {
        const char *s;
        Py_ssize_t n;
        if (utf8_of(code, &s, &n) < 0 || PUT(b, ",\"code\":") < 0 || put_json_bytes(b, s, n) < 0)
            status = FAILED;
    }
    Py_DECREF(code);
    return status;
}

/* xdm.broadlog_record */
static int put_broadlog(Buf *b, const Context *c, const Event *ev, const Entry *outcome) {
    const Field *kind = &ev->field[TYPE];
    const Entry *email_type = text_is(&ev->field[CHANNEL], "email")
                                  ? lookup(&c->email_delivery, kind->text, kind->len) : NULL;
    if (email_type) CHECK(put_head(b, c, ev, "broadLog", email_type->value, email_type->value_len));
    else CHECK(put_head(b, c, ev, "broadLog", "message.feedback", 16));
    const Field *reason = NULL;
    CHECK_PUT(PUT(b, "\"messageDeliveryfeedback\":{\"feedbackStatus\":"));
    CHECK_PUT(put_json_bytes(b, outcome->value, outcome->value_len));
    if (outcome->extra) {
        CHECK(failure_reason(ev, &reason));
        CHECK_PUT(PUT(b, ",\"messageFailure\":{\"type\":"));
        CHECK_PUT(put_json_bytes(b, outcome->extra, outcome->extra_len));
        int bounce = text_is(kind, "bounced_soft") || text_is(kind, "bounced_hard");
        CHECK_PUT(bounce ? PUT(b, ",\"category\":\"async\"") : PUT(b, ",\"category\":\"sync\""));
        if (reason) {
            CHECK_PUT(PUT(b, ",\"reason\":"));
            CHECK_PUT(put_json_bytes(b, reason->text, reason_bytes(reason)));
            CHECK(put_code(b, c, reason));
        }
        CHECK_PUT(PUT(b, "}"));
    }
    CHECK_PUT(PUT(b, "}"));
    int first = 1;
    CHECK(put_profile_and_campaign(b, c, ev, &first));
    CHECK(put_member(b, &first, "\"broadlogID\":", &ev->field[EVENT_ID]));
    CHECK_PUT(PUT(b, ",\"status\":"));
    CHECK_PUT(put_json_bytes(b, outcome->value, outcome->value_len));
    if (outcome->extra) {
        if (reason) {
            CHECK_PUT(PUT(b, ",\"reasonMessage\":"));
            CHECK_PUT(put_json_bytes(b, reason->text, reason_bytes(reason)));
        }
        int hard = outcome->extra_len == 4 && memcmp(outcome->extra, "hard", 4) == 0;
        CHECK_PUT(hard ? PUT(b, ",\"quarantine\":true") : PUT(b, ",\"quarantine\":false"));
    }
    return put_tail(b, c, ev);
}

/* xdm._is_bot */
static int is_bot(const Event *ev, int *bot) {
    *bot = 0;
    if (ev->field[RAW].kind != JOBJECT) return DONE; /* xdm._raw */
    const Field *open = &ev->raw[RAW_MACHINE_OPEN];
    switch (open->kind) {
    case JTRUE: *bot = 1; break;
    case JSTRING:
        if (!open->ascii) return REFERENCE;
        *bot = open->len == 4 && strncasecmp(open->text, "true", 4) == 0;
        break;
    case ABSENT: case JNULL: case JFALSE: case JINT: break;
    default: return REFERENCE;
    }
    if (ev->raw[RAW_BOT_CLICK].kind == JTRUE) *bot = 1;
    return DONE;
}

/* xdm.trackinglog_record */
static int put_trackinglog(Buf *b, const Context *c, const Event *ev, const Entry *interaction) {
    int bot, has_url;
    CHECK(is_bot(ev, &bot));
    const Field *url = &ev->field[URL];
    CHECK(text_truth(url, &has_url));
    char shown[80];
    Py_ssize_t shown_len = interaction->value_len;
    int bot_kind = bot && ((shown_len == 4 && memcmp(interaction->value, "open", 4) == 0) ||
                           (shown_len == 5 && memcmp(interaction->value, "click", 5) == 0));
    if (shown_len > 60) return REFERENCE;
    if (bot_kind) {
        memcpy(shown, "bot_", 4);
        memcpy(shown + 4, interaction->value, (size_t)shown_len);
        shown_len += 4;
    } else {
        memcpy(shown, interaction->value, (size_t)shown_len);
    }
    const Field *channel = &ev->field[CHANNEL];
    const char *event_type = "message.tracking";
    Py_ssize_t event_type_len = 16;
    if (text_is(channel, "email")) {
        const Entry *found = lookup(&c->email_tracking, shown, shown_len);
        if (found) {
            event_type = found->value;
            event_type_len = found->value_len;
        }
    } else if (text_is(channel, "push") && shown_len == 4 && memcmp(shown, "open", 4) == 0) {
        event_type = "pushTracking.applicationOpened";
        event_type_len = 30;
    }
    CHECK(put_head(b, c, ev, "trackingLog", event_type, event_type_len));
    CHECK_PUT(PUT(b, "\"messageInteraction\":{\"interactionType\":"));
    CHECK_PUT(put_json_bytes(b, shown, shown_len));
    CHECK_PUT(bot ? PUT(b, ",\"isBot\":true") : PUT(b, ",\"isBot\":false"));
    if (has_url) {
        CHECK_PUT(PUT(b, ",\"url\":"));
        CHECK_PUT(put_json_bytes(b, url->text, url->len));
    }
    CHECK_PUT(PUT(b, "}"));
    int first = 1;
    CHECK(put_profile_and_campaign(b, c, ev, &first));
    CHECK(put_member(b, &first, "\"trackinglogID\":", &ev->field[EVENT_ID]));
    if (has_url) {
        CHECK(put_member(b, &first, "\"url\":", url));
        CHECK(put_member(b, &first, "\"urlCategory\":", channel));
    }
    return put_tail(b, c, ev);
}

/* xdm.NotableEvents.wants for a delivery: is its address With errors? (quarantine.relevant
 * and address_key, for ASCII addresses; the reference answers for any other.) */
static int delivery_wanted(const Context *c, const Event *ev, PyObject **line_object,
                           const unsigned char *line, Py_ssize_t line_len, int *wanted) {
    const Field *channel = &ev->field[CHANNEL];
    *wanted = 0;
    if (channel->kind == JSTRING) {
        const Entry *field = lookup(&c->address_fields, channel->text, channel->len);
        if (field == NULL) return DONE; /* no address on this channel */
        Field name = {JSTRING, field->value, field->value_len, 1, 0};
        int index = field_index(FIELD_NAMES, N_FIELDS, &name);
        const Field *address = index >= 0 ? &ev->field[index] : NULL;
        if (address && (address->kind == ABSENT || address->kind == JNULL ||
                        (address->kind == JSTRING && address->len == 0)))
            return DONE;
        if (address && address->kind == JSTRING && address->ascii && address->len <= 512 &&
            channel->ascii && channel->len < 64) {
            /* str.strip() (Python's whitespace, \x1c-\x1f included), .lower() for email */
            const char *s = address->text, *e = s + address->len;
            while (s < e && is_space((unsigned char)*s)) s++;
            while (e > s && is_space((unsigned char)e[-1])) e--;
            unsigned char normal[512];
            int lower = text_is(channel, "email");
            for (Py_ssize_t i = 0; i < e - s; i++) {
                unsigned char ch = (unsigned char)s[i];
                normal[i] = lower && ch >= 'A' && ch <= 'Z' ? (unsigned char)(ch - 'A' + 'a') : ch;
            }
            Sha256 h;
            sha256_init(&h);
            sha256_update(&h, normal, (size_t)(e - s));
            char key[64 + 1 + 64];
            memcpy(key, channel->text, (size_t)channel->len);
            key[channel->len] = '|';
            sha256_hex(&h, key + channel->len + 1);
            PyObject *name_key = PyUnicode_FromStringAndSize(key, channel->len + 65);
            if (name_key == NULL) return FAILED;
            int found = PySet_Contains(c->with_errors, name_key);
            Py_DECREF(name_key);
            if (found < 0) return FAILED;
            *wanted = found;
            return DONE;
        }
    }
    if (*line_object == NULL) {
        *line_object = PyBytes_FromStringAndSize((const char *)line, line_len);
        if (*line_object == NULL) return FAILED;
    }
    PyObject *answer = PyObject_CallOneArg(c->delivery_matters, *line_object);
    if (answer == NULL) return FAILED;
    *wanted = PyObject_IsTrue(answer);
    Py_DECREF(answer);
    return *wanted < 0 ? FAILED : DONE;
}

/* One parsed event into its log (or none). */
static int put_event(const Context *c, const Event *ev, Buf *logs[2], Py_ssize_t counts[2]) {
    const Field *kind = &ev->field[TYPE];
    if (kind->kind != JSTRING) return REFERENCE;
    const Entry *outcome = lookup(&c->outcomes, kind->text, kind->len);
    const Entry *interaction = outcome ? NULL : lookup(&c->interactions, kind->text, kind->len);
    if (!outcome && !interaction) return DONE; /* in neither log */
    if (ev->field[CHANNEL].kind != JSTRING) return REFERENCE;
    int log = outcome ? 0 : 1;
    Buf *b = logs[log];
    Py_ssize_t mark = b->len;
    int status = outcome ? put_broadlog(b, c, ev, outcome) : put_trackinglog(b, c, ev, interaction);
    if (status == DONE) counts[log]++;
    else b->len = mark; /* nothing half-written stays */
    return status;
}

/* The reference takes the line: reference(line) -> (log or -1, record line, notable). */
static int put_by_reference(PyObject *reference, PyObject *line, Buf *logs[2],
                            Py_ssize_t counts[2], PyObject *notable) {
    PyObject *written = PyObject_CallOneArg(reference, line);
    if (written == NULL) return FAILED;
    int log, wanted, status = DONE;
    const char *text;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(written, "iy#p", &log, &text, &n, &wanted) || log < -1 || log > 1) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "reference must return (-1, 0 or 1, bytes, bool)");
        status = FAILED;
    } else if (log >= 0 && (buf_put(logs[log], text, n) < 0 || PUT(logs[log], "\n") < 0)) {
        status = FAILED;
    } else {
        if (log >= 0) counts[log]++;
        if (wanted && PyList_Append(notable, line) < 0) status = FAILED;
    }
    Py_DECREF(written);
    return status;
}

static int all_space(const unsigned char *p, const unsigned char *end) {
    for (; p < end; p++)
        if (!(*p == ' ' || (*p >= '\t' && *p <= '\r'))) return 0;
    return 1;
}

/* Output buffers are reused between calls: fresh megabytes every call cost more in page
 * faults than the records themselves. A call takes a set from the pool and gives it back;
 * both happen under the GIL, and a call running at the same time on another thread (the
 * reference's callbacks let it in) takes a set of its own. */
typedef struct {
    Buf broadlog, tracking, scratch;
} Buffers;

#define POOLED 4
static Buffers *pool[POOLED];
static int pooled;

static Buffers *take_buffers(void) {
    if (pooled > 0) return pool[--pooled];
    return PyMem_Calloc(1, sizeof(Buffers));
}

static void give_back(Buffers *buffers) {
    buffers->broadlog.len = buffers->tracking.len = buffers->scratch.len = 0;
    if (pooled < POOLED) {
        pool[pooled++] = buffers;
        return;
    }
    buf_free(&buffers->broadlog);
    buf_free(&buffers->tracking);
    buf_free(&buffers->scratch);
    PyMem_Free(buffers);
}

static PyObject *experience_lines(PyObject *module, PyObject *args) {
    Py_buffer data;
    Py_ssize_t start, max_events;
    PyObject *outcomes, *interactions, *email_delivery, *email_tracking, *channel_uris;
    PyObject *notable_types, *address_fields, *reference, *namespace, *tenant_key, *ingested_at;
    Context c;
    if (!PyArg_ParseTuple(args, "y*nnO!O!O!O!O!OO!O!OOOUUU:experience_lines", &data, &start,
                          &max_events, &PyDict_Type, &outcomes, &PyDict_Type, &interactions,
                          &PyDict_Type, &email_delivery, &PyDict_Type, &email_tracking,
                          &PyDict_Type, &channel_uris, &c.failure_code, &PyFrozenSet_Type,
                          &notable_types, &PyDict_Type, &address_fields, &c.with_errors,
                          &c.delivery_matters, &reference, &namespace, &tenant_key, &ingested_at))
        return NULL;
    if (c.with_errors != Py_None && !PyFrozenSet_Check(c.with_errors)) {
        PyErr_SetString(PyExc_TypeError, "with_errors must be a frozenset or None");
        PyBuffer_Release(&data);
        return NULL;
    }
    Buffers *buffers = take_buffers();
    if (buffers == NULL) {
        PyBuffer_Release(&data);
        return PyErr_NoMemory();
    }
    Buf *logs[2] = {&buffers->broadlog, &buffers->tracking};
    Py_ssize_t counts[2] = {0, 0}, events = 0;
    PyObject *notable = NULL, *result = NULL;
    const unsigned char *base = data.buf, *end = base + data.len;
    const unsigned char *p = base + (start < 0 ? 0 : start > data.len ? data.len : start);
    if (load_table(outcomes, &c.outcomes) < 0 || load_table(interactions, &c.interactions) < 0 ||
        load_table(email_delivery, &c.email_delivery) < 0 ||
        load_table(email_tracking, &c.email_tracking) < 0 ||
        load_table(channel_uris, &c.channel_uris) < 0 || load_table(notable_types, &c.notable) < 0 ||
        load_table(address_fields, &c.address_fields) < 0 ||
        utf8_of(namespace, &c.namespace, &c.namespace_len) < 0 ||
        utf8_of(tenant_key, &c.tenant_key, &c.tenant_key_len) < 0 ||
        utf8_of(ingested_at, &c.ingested_at, &c.ingested_at_len) < 0)
        goto done;
    if ((notable = PyList_New(0)) == NULL) goto done;
    Event ev;
    while (p < end && events < max_events) {
        const unsigned char *newline = memchr(p, '\n', (size_t)(end - p));
        const unsigned char *line_end = newline ? newline : end;
        const unsigned char *line = p;
        p = newline ? newline + 1 : end;
        if (line == line_end || (!newline && all_space(line, line_end))) continue; /* as the store reads */
        events++;
        if (buf_reserve(&buffers->scratch, line_end - line) < 0) goto done;
        Parser ps = {line, line_end, buffers->scratch.data, 0, 0};
        int status = parse_event(&ps, &ev);
        if (status == DONE) status = put_event(&c, &ev, logs, counts);
        if (status == FAILED) goto done;
        if (status == REFERENCE) {
            PyObject *text = PyBytes_FromStringAndSize((const char *)line, line_end - line);
            if (text == NULL) goto done;
            status = put_by_reference(reference, text, logs, counts, notable);
            Py_DECREF(text);
            if (status != DONE) goto done;
            continue;
        }
        const Field *kind = &ev.field[TYPE];
        int wanted = kind->kind == JSTRING && lookup(&c.notable, kind->text, kind->len);
        PyObject *text = NULL;
        if (!wanted && c.with_errors != Py_None && text_is(kind, "delivered") &&
            delivery_wanted(&c, &ev, &text, line, line_end - line, &wanted) != DONE) {
            Py_XDECREF(text);
            goto done;
        }
        if (wanted) {
            if (text == NULL) text = PyBytes_FromStringAndSize((const char *)line, line_end - line);
            if (text == NULL || PyList_Append(notable, text) < 0) {
                Py_XDECREF(text);
                goto done;
            }
        }
        Py_XDECREF(text);
    }
    result = Py_BuildValue("nny#ny#nO", (Py_ssize_t)(p - base), events,
                           logs[0]->data ? logs[0]->data : "", logs[0]->len, counts[0],
                           logs[1]->data ? logs[1]->data : "", logs[1]->len, counts[1], notable);
done:
    Py_XDECREF(notable);
    give_back(buffers);
    PyBuffer_Release(&data);
    return result;
}

/* ---- helpers the tests compare with the reference ------------------------------------- */

static PyObject *sha256_hexdigest(PyObject *module, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) return NULL;
    Sha256 h;
    sha256_init(&h);
    sha256_update(&h, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    char hex[64];
    sha256_hex(&h, hex);
    return PyUnicode_FromStringAndSize(hex, 64);
}

static PyObject *iso_millis(PyObject *module, PyObject *arg) {
    long long millis = PyLong_AsLongLong(arg);
    if (millis == -1 && PyErr_Occurred()) return NULL;
    Buf b = {0};
    int status = put_iso(&b, millis);
    PyObject *result = NULL;
    if (status == DONE) result = PyUnicode_FromStringAndSize(b.data + 1, b.len - 2);
    else if (status == REFERENCE) result = Py_NewRef(Py_None);
    buf_free(&b);
    return result;
}

static PyObject *smtp_code_of(PyObject *module, PyObject *arg) {
    if (!PyUnicode_Check(arg) || !PyUnicode_IS_ASCII(arg)) Py_RETURN_NONE;
    Py_ssize_t start, end;
    if (!smtp_code(PyUnicode_DATA(arg), PyUnicode_GET_LENGTH(arg), &start, &end)) Py_RETURN_NONE;
    return PyUnicode_Substring(arg, start, end);
}

static PyMethodDef METHODS[] = {
    {"experience_lines", experience_lines, METH_VARARGS,
     "experience_lines(data, start, max_events, outcomes, interactions, email_delivery,\n"
     "    email_tracking, channel_uris, failure_code, notable_types, address_fields,\n"
     "    with_errors, delivery_matters, reference, namespace, tenant_key, ingested_at)\n"
     "-> (next offset, events, broadLog lines, count, trackingLog lines, count, notable lines)"},
    {"sha256_hexdigest", sha256_hexdigest, METH_O, "sha256 as hex digits"},
    {"iso_millis", iso_millis, METH_O, "epoch ms as XDM date-time; None outside 1970-9999"},
    {"smtp_code", smtp_code_of, METH_O, "the SMTP code in ASCII text, or None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {
    PyModuleDef_HEAD_INIT, "switchboard_speedups",
    "The log export's XDM records in C (the reference is core/export/xdm.py).", -1, METHODS,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_switchboard_speedups(void) { return PyModule_Create(&MODULE); }
