"""Fast paths the engine owns and swaps in when it is built (`cpu`: compiled steps and C++ kernels).

The model never imports them; nothing but `r1lab.engine` does (tests/test_layering.py)."""
