// Launch 2 of the chunked CUDA path for per-key gates (KEYGATE, see chunked/state.cuh): Qg and Kd
// from launch 1 in place of q and k. Template arguments from cuda/chunked.py: Dk, Dv, BV, EXACT,
// MASKED, SHARE_WQ, NH. Grid: (Dv / BV * 128 NH, Hv, B), threadgroup (128 NH, 1, 1).
gdn_tc::state_output<Dk, Dv, BV, EXACT, MASKED, SHARE_WQ, NH, true>(
    Qg, Kd, W, U, Aqk, G, state_in, mask, Qg_shape[1], Qg_shape[2], (int)gridDim.y, y, state_out, Gk);
