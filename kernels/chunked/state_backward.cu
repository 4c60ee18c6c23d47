// Backward, stage state_backward (see chunked/backward.cuh). Template arguments from
// cuda/chunked_backward.py: Dk, Dv, BV, EXACT, MASKED. Grid: (Dv / BV * 128, Hv, B), threadgroup (128, 1, 1).
gdn_tc::state_backward<Dk, Dv, BV, EXACT, MASKED>(q, k, W, Aqk, G, dy, mask, dstate, q_shape[1], q_shape[2],
                                                  (int)gridDim.y, dU, dS, dS0);
