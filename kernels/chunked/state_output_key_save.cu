// state_output_key.cu that also writes the state after every SAVE_EVERY-th full chunk to `saved`
// (see chunked/state.cuh). Template arguments from cuda/chunked.py: Dk, Dv, BV, EXACT, MASKED,
// SHARE_WQ, NH, SAVE_EVERY.
gdn_tc::state_output<Dk, Dv, BV, EXACT, MASKED, SHARE_WQ, NH, true, SAVE_EVERY>(
    Qg, Kd, W, U, Aqk, G, state_in, mask, Qg_shape[1], Qg_shape[2], (int)gridDim.y, y, state_out, Gk, saved);
