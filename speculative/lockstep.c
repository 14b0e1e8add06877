/* Greedy lockstep steps of llama.cpp sessions in C, between two things the caller must hear of.

   The loop ``speculative.llama_runs`` runs in Python (a decode of every member's pending token,
   an argmax of each row of logits, the next step's batch) without a return to the interpreter
   between the steps: after a decode has streamed a model's weights through the CPU's caches,
   the Python between two decodes ran cold, 50-90 us a step for SmolLM2's 49,152 logits. It
   runs until a member's token is the end of sequence, ``max_steps`` steps, ``deadline``, or
   until another thread sets ``*interrupt`` (a session waiting to join): whichever comes first,
   after the step in flight. Built and loaded by ``speculative.native_steps`` (ctypes releases
   the GIL for the whole call). */

#define _POSIX_C_SOURCE 199309L /* clock_gettime under -std=c11 */

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
