"""onebit's C ternary kernels vs torch F.linear fp32/bf16 (same as `onebit bench kernels`)."""
import sys

from onebit.benchmarks.kernels import main

if __name__ == "__main__":
    sys.exit(main())
