// Launch 2 of the chunked CUDA path, stages state and output (see chunked/common.cuh). Template
// arguments from cuda/chunked.py: Dk, Dv, BV, EXACT, MASKED, SHARE_WQ, NH.
// Grid: (Dv / BV * 128 NH, Hv, B), threadgroup (128 NH, 1, 1).
gdn_tc::state_output<Dk, Dv, BV, EXACT, MASKED, SHARE_WQ, NH>(
    q, k, W, U, Aqk, G, state_in, mask, q_shape[1], q_shape[2], (int)gridDim.y, y, state_out);
