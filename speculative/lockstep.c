/* Greedy lockstep steps of llama.cpp sessions in C, between two things the caller must hear of.

   The loop ``speculative.llama_runs`` runs in Python (a decode of every member's pending token,
   an argmax of each row of logits, the next step's batch) without a return to the interpreter
   between the steps: after a decode has streamed a model's weights through the CPU's caches,
   the Python between two decodes ran cold, 50-90 us a step for SmolLM2's 49,152 logits. It
   runs until a member's token is the end of sequence, ``max_steps`` steps, ``deadline``, or
   until another thread sets ``*interrupt`` (a session waiting to join): whichever comes first,
   after the step in flight. ``tandem_speculate`` does the same for a lone session's drafting
   rounds (``speculative.lone_rounds``): the draft's proposal, the verifier's decode, the greedy
   verdict and both sequences' rollback. Built and loaded by ``speculative.native_steps``
   (ctypes releases the GIL for the whole call). */

#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */

#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

/* llama.h's llama_batch, field for field (``native_steps`` checks llama-cpp-python's own mirror of it) */
typedef struct {
    int32_t n_tokens;
    int32_t *token;
    float *embd;
    int32_t *pos;
    int32_t *n_seq_id;
    int32_t **seq_id;
    int8_t *logits;
} tandem_batch;

typedef int32_t (*tandem_decode_fn)(void *ctx, tandem_batch batch);
typedef float *(*tandem_logits_fn)(void *ctx);

static double tandem_now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts); /* Python's time.perf_counter on Linux */
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* numpy's argmax: the first index of the largest value, or of the first NaN if there is one. Two vectors of
   four lanes at a time in the compiler's vector extension (SSE at the baseline), then the first index holding
   the largest: 10-30 us for SmolLM2's 49,152 logits (where the largest lies), 29 as one plain loop. */
typedef float tandem_f4 __attribute__((vector_size(16)));
typedef int32_t tandem_i4 __attribute__((vector_size(16)));

int32_t tandem_argmax(const float *x, int32_t n) { /* (exported for its test) */
    int32_t j = 0, nan = 0;
    float top = x[0];
    if (n >= 8) {
        tandem_f4 a, b, v, w;
        tandem_i4 odd = {0, 0, 0, 0}, more;
        memcpy(&a, x, sizeof a);
        b = a;
        for (; j + 8 <= n; j += 8) {
            memcpy(&v, x + j, sizeof v);
            memcpy(&w, x + j + 4, sizeof w);
            odd |= (v != v) | (w != w);
            more = v > a;
            a = (tandem_f4)((more & (tandem_i4)v) | (~more & (tandem_i4)a));
            more = w > b;
            b = (tandem_f4)((more & (tandem_i4)w) | (~more & (tandem_i4)b));
        }
        for (int k = 0; k < 4; k++) {
            nan |= odd[k];
            top = a[k] > top ? a[k] : top;
            top = b[k] > top ? b[k] : top;
        }
    }
    for (; j < n; j++) {
        nan |= x[j] != x[j];
        top = x[j] > top ? x[j] : top;
    }
    if (nan || top != top) {
        for (j = 0; j < n; j++)
            if (x[j] != x[j]) return j;
    }
    j = 0;
    if (n >= 8) {
        tandem_f4 t = {top, top, top, top}, v;
        tandem_i4 eq;
        for (; j + 4 <= n; j += 4) {
            memcpy(&v, x + j, sizeof v);
            eq = v == t;
            if (eq[0] | eq[1] | eq[2] | eq[3]) break;
        }
    }
    for (; j < n; j++)
        if (x[j] == top) return j;
    return 0;
}

/* Steps of the ``n`` members the batch holds (their first step's tokens, positions, sequence ids,
   every row asking for logits). Each step's chosen tokens go to ``tokens[step * n + row]``, and are
   the next step's batch. Returns the steps decoded; ``*rc`` is a failed decode's status (0: none
   failed). */
int32_t tandem_lockstep(tandem_decode_fn decode, tandem_logits_fn logits, void *ctx, tandem_batch *batch,
                        int32_t n_vocab, int32_t eos, int32_t max_steps, double deadline,
                        const volatile int32_t *interrupt, int32_t *tokens, int32_t *rc) {
    const int32_t n = batch->n_tokens;
    int32_t step = 0;
    *rc = 0;
    while (step < max_steps) {
        if (step > 0) {
            for (int32_t i = 0; i < n; i++) {
                batch->token[i] = tokens[(step - 1) * n + i];
                batch->pos[i] += 1;
            }
        }
        int32_t status = decode(ctx, *batch);
        if (status != 0) {
            *rc = status;
            break;
        }
        const float *rows = logits(ctx);
        int32_t ended = 0;
        for (int32_t i = 0; i < n; i++) {
            int32_t chosen = tandem_argmax(rows + (int64_t)i * n_vocab, n_vocab);
            tokens[step * n + i] = chosen;
            ended |= chosen == eos;
        }
        step++;
        if (ended || *interrupt || tandem_now_s() >= deadline) break;
    }
    return step;
}

/* One model's side of a lone session's drafting rounds: its context, KV memory, batch and sequence. */
typedef struct {
    void *ctx;
    void *memory;        /* llama_get_memory(ctx), for llama_memory_seq_rm */
    tandem_batch *batch; /* room for ``batch_tokens`` tokens */
    int32_t batch_tokens;
    int32_t seq;
    int32_t n_past;      /* positions its sequence holds */
    int32_t n_vocab;
    int32_t n_ctx;       /* positions a sequence may hold */
} tandem_side;

typedef bool (*tandem_seq_rm_fn)(void *memory, int32_t seq, int32_t p0, int32_t p1);

#define TANDEM_MAX_DRAFT 16 /* ``speculative.types.MAX_DRAFT_TOKENS`` */

/* One round as it ran: ``drafted[:k]`` proposed after evaluating ``caught_up`` committed tokens, ``n_matches``
   of them accepted, then the verifier's ``token``. */
typedef struct {
    int32_t drafted[TANDEM_MAX_DRAFT];
    int32_t k;
    int32_t caught_up;
    int32_t n_matches;
    int32_t token;
    double draft_ms;
    double verify_ms;
} tandem_round;

/* The two structs' sizes, for the caller's mirror of them (``speculative.lone_rounds`` checks its own). */
void tandem_layout(int32_t *side, int32_t *round) {
    *side = (int32_t)sizeof(tandem_side);
    *round = (int32_t)sizeof(tandem_round);
}

static void tandem_fill(tandem_batch *b, int32_t at, int32_t token, int32_t pos, int32_t seq, int8_t logits) {
    b->token[at] = token;
    b->pos[at] = pos;
    b->n_seq_id[at] = 1;
    b->seq_id[at][0] = seq;
    b->logits[at] = logits;
}

/* The draft's proposal of a round: ``feed`` evaluated (logits after its last), then ``want`` tokens drafted, one
   decode each but the last. Returns a failed decode's status, its positions rolled back. */
static int32_t tandem_draft(tandem_decode_fn decode, tandem_logits_fn logits, tandem_seq_rm_fn seq_rm,
                            tandem_side *d, const int32_t *feed, int32_t n_feed, int32_t want, int32_t *drafted) {
    const int32_t start = d->n_past;
    tandem_batch *b = d->batch;
    for (int32_t i = 0; i < n_feed; i++) tandem_fill(b, i, feed[i], start + i, d->seq, i == n_feed - 1);
    b->n_tokens = n_feed;
    for (int32_t j = 0; j < want; j++) {
        int32_t status = decode(d->ctx, *b);
        if (status != 0) {
            seq_rm(d->memory, d->seq, start, -1);
            d->n_past = start;
            return status;
        }
        d->n_past += b->n_tokens;
        drafted[j] = tandem_argmax(logits(d->ctx), d->n_vocab); /* the one row asked for */
        if (j + 1 < want) {
            tandem_fill(b, 0, drafted[j], d->n_past, d->seq, 1);
            b->n_tokens = 1;
        }
    }
    return 0;
}

/* A lone greedy session's drafting rounds (``LlamaCppVerifier.speculate_greedy``'s, round for round): each
   drafts ``want`` tokens (up to ``k``; none where fewer are left to emit or to fit either context), decodes
   ``[pending, x1..xk]`` on the verifier, keeps the agreeing prefix and the verifier's token, and rolls the
   rest of both sequences back. ``feed`` holds the committed tokens the draft has not evaluated (``feed_cap``
   at most). Rounds run until ``max_tokens`` are emitted, the end-of-sequence token, ``max_rounds``, the
   deadline or an interrupt; or before a round whose catch-up would overflow ``feed``. Returns the rounds
   run (each in ``rounds``); ``*rc`` is a failed decode's status, that round undone in both models. */
int32_t tandem_speculate(tandem_decode_fn decode, tandem_logits_fn logits, tandem_seq_rm_fn seq_rm, tandem_side *v,
                         tandem_side *d, int32_t pending, int32_t *feed, int32_t n_feed, int32_t feed_cap, int32_t k,
                         int32_t max_tokens, int32_t eos, double deadline, const volatile int32_t *interrupt,
                         const volatile int32_t *interrupt_draft, tandem_round *rounds, int32_t max_rounds, int32_t *rc) {
    int32_t r = 0, emitted = 0, committed = d->n_past + n_feed; /* the draft's committed: its cache, then feed */
    *rc = 0;
    if (k > TANDEM_MAX_DRAFT) k = TANDEM_MAX_DRAFT;
    while (r < max_rounds) {
        tandem_round *out = &rounds[r];
        int32_t want = k;
        want = want < max_tokens - emitted - 1 ? want : max_tokens - emitted - 1;
        want = want < v->n_ctx - v->n_past - 1 ? want : v->n_ctx - v->n_past - 1;
        want = want < d->n_ctx - committed - 1 ? want : d->n_ctx - committed - 1;
        if (want < 0) want = 0;
        if (want + 1 > v->batch_tokens || v->n_past + want + 1 > v->n_ctx || n_feed > d->batch_tokens ||
            (want == 0 && n_feed >= feed_cap))
            break; /* (the caller's own round says what is wrong, if anything is) */
        const int32_t d_start = d->n_past, fed = n_feed;
        double t0 = tandem_now_s();
        if (want > 0) {
            int32_t status = tandem_draft(decode, logits, seq_rm, d, feed, n_feed, want, out->drafted);
            if (status != 0) {
                *rc = status;
                break;
            }
        }
        double t1 = tandem_now_s();
        tandem_batch *b = v->batch;
        tandem_fill(b, 0, pending, v->n_past, v->seq, 1);
        for (int32_t i = 0; i < want; i++) tandem_fill(b, i + 1, out->drafted[i], v->n_past + i + 1, v->seq, 1);
        b->n_tokens = want + 1;
        int32_t status = decode(v->ctx, *b);
        if (status != 0) {
            seq_rm(v->memory, v->seq, v->n_past, -1);
            seq_rm(d->memory, d->seq, d_start, -1);
            d->n_past = d_start;
            *rc = status;
            break;
        }
        const float *rows = logits(v->ctx);
        int32_t m = 0, token = 0;
        for (int32_t i = 0; i <= want; i++) {
            token = tandem_argmax(rows + (int64_t)i * v->n_vocab, v->n_vocab);
            if (i == want || token != out->drafted[i]) break;
            m++;
        }
        v->n_past += 1 + m;
        if (m < want) seq_rm(v->memory, v->seq, v->n_past, -1); /* the rejected tail */
        if (want > 0) { /* the draft evaluated its feed and want - 1 drafted tokens: keep the accepted ones */
            int32_t keep = committed + (m < want - 1 ? m : want - 1);
            if (keep < d->n_past) seq_rm(d->memory, d->seq, keep, -1);
            d->n_past = keep;
            n_feed = 0;
            if (m == want) feed[n_feed++] = out->drafted[want - 1];
        }
        feed[n_feed++] = token;
        committed += 1 + m;
        pending = token;
        emitted += 1 + m;
        int32_t ended = token == eos;
        for (int32_t i = 0; i < m; i++) ended |= out->drafted[i] == eos;
        out->k = want;
        out->caught_up = want > 0 ? fed : 0;
        out->n_matches = m;
        out->token = token;
        out->draft_ms = want > 0 ? (t1 - t0) * 1e3 : 0.0;
        out->verify_ms = (tandem_now_s() - t1) * 1e3;
        r++;
        if (ended || emitted >= max_tokens || *interrupt || *interrupt_draft || tandem_now_s() >= deadline) break;
    }
    return r;
}
