// state_output_regs.cu that also writes the state after every SAVE_EVERY-th full chunk to `saved`
// (see chunked/state_regs.cuh). Template arguments from cuda/chunked.py: Dk, Dv, NW, MASKED, SAVE_EVERY.
gdn_tc::state_output_regs<Dk, Dv, NW, MASKED, SAVE_EVERY>(
    q, k, W, U, Aqk, G, state_in, mask, q_shape[1], q_shape[2], (int)gridDim.y, y, state_out, saved);
