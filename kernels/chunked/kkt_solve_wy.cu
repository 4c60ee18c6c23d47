// Launch 1 of the chunked CUDA path, stages kkt_solve and wy (see chunked/common.cuh). Template
// arguments from cuda/chunked.py: Dk, Dv, EXACT, FUSED, MASKED, HAS_LB, NEG.
// Grid: (chunks * 128, Hv, B), threadgroup (128, 1, 1).
gdn_tc::kkt_solve_wy<Dk, Dv, EXACT, FUSED, MASKED, HAS_LB, NEG>(
    q, k, v, gate_a, gate_b, A_log, dt_bias, lower_bound, mask, q_shape[1], q_shape[2], v_shape[2],
    W, U, Aqk, G);
