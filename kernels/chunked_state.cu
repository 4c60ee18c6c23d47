// Launch 2 of the chunked CUDA path (see chunked_tc.cuh). Template arguments from cuda.py:
// Dk, Dv, BV, EXACT, MASKED, SHARE_WQ, NH. Grid: (Dv / BV * 128 NH, Hv, B), threadgroup (128 NH, 1, 1).
gdn_tc::state_pass<Dk, Dv, BV, EXACT, MASKED, SHARE_WQ, NH>(
    q, k, W, U, Aqk, G, state_in, mask, q_shape[1], q_shape[2], (int)gridDim.y, y, state_out);
