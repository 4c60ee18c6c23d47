// Launch 2 of the chunked CUDA path with the state in registers, stages state and output (see
// chunked/state_regs.cuh). Template arguments from cuda/chunked.py: Dk, Dv, NW, MASKED.
// Grid: (Dv / (16 NW) * 32 NW, Hv, B), threadgroup (32 NW, 1, 1).
gdn_tc::state_output_regs<Dk, Dv, NW, MASKED>(
    q, k, W, U, Aqk, G, state_in, mask, q_shape[1], q_shape[2], (int)gridDim.y, y, state_out);
