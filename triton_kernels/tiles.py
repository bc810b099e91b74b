"""What the Triton kernels of several families share: the order in which programs take the output
tiles of a matrix product."""

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """The output tile (pid_m, pid_n) of program pid: GROUP_M consecutive row tiles walk the column
    tiles together, so that a tile of the weight is read from L2 by GROUP_M programs in a row."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * tiles_n
    first_m = (pid // group) * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    return first_m + (pid % group) % group_m, (pid % group) // group_m
