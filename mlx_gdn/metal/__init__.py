"""The Metal backend: kernel objects (`kernel`), the recurrent launches (`backend`) and the chunked pair (`chunked`)."""
