// state_output.cu that also writes the state after every SAVE_EVERY-th full chunk to `saved`
// [B, T / (64 SAVE_EVERY), Hv, Dv, Dk] (see chunked/state.cuh). Template arguments from
// cuda/chunked.py: Dk, Dv, BV, EXACT, MASKED, SHARE_WQ, NH, SAVE_EVERY.
gdn_tc::state_output<Dk, Dv, BV, EXACT, MASKED, SHARE_WQ, NH, false, SAVE_EVERY>(
    q, k, W, U, Aqk, G, state_in, mask, q_shape[1], q_shape[2], (int)gridDim.y, y, state_out, nullptr, saved);
