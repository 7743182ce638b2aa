"""BitLinear vs nn.Linear forward+backward (same as `onebit bench bitlinear`)."""
import sys

from onebit.benchmarks.bitlinear import main

if __name__ == "__main__":
    sys.exit(main())
