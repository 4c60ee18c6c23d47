// Backward, stage chunk_grads (see chunked/backward.cuh). Template arguments from
// cuda/chunked_backward.py: Dk, Dv, EXACT, MASKED. Grid: (chunks * 128, Hv, B), threadgroup (128, 1, 1).
gdn_tc::chunk_grads<Dk, Dv, EXACT, MASKED>(q, k, v, beta, W, U, Aqk, G, state_in, saved, dS, dU, dy, mask, q_shape[1],
                                           q_shape[2], v_shape[2], dq, dk, dv, dbeta, dl);
