"""The CUDA backend: kernel objects and the prelude (`kernel`), the recurrent launches (`backend`) and the tensor-core chunked pair (`chunked`)."""
