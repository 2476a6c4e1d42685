"""o2o's shared core. Importing it compiles JAX's threefry hash unrolled on the CPU (same random
bits, faster jitted updates; ``rl.prng`` says why and how to switch back)."""

from rl.prng import use_unrolled_threefry

use_unrolled_threefry()
