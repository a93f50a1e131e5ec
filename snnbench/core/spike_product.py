"""The product of two computed tensors in the spiking network (attention's Q·Kᵀ and attention·V), driven by events.

Each step the product receives the increments a_t, b_t of its two operands (what their spiking layers emitted at
t) and keeps their running sums A_t = a_1 + ... + a_t and B_t. The product of the running sums grows by

    A_t B_t − A_{t−1} B_{t−1} = a_t B_t + A_{t−1} b_t

(matrix products over the last two dimensions, batched over the others: heads), so a non-zero entry a_t[i, k]
adds one row of B_t to row i of the product, and a non-zero entry b_t[k, j] one column of A_{t−1} to its column
j: where an operand is a spike train, the work is one accumulate per spike and element of the other operand, as
in SpikeZIP-TF's spike-equivalent attention (Kundu et al., ICML 2024) and SpikingJelly's STA recipe.

Those implementations read the summed output of a network as its value. snnbench's spiking layers encode a value
x as a rate, summing to t·x over t steps, like its analog operators (t·f(mean input)); so the product emits at
step t the increment of A_t B_t / t = t · (A_t / t)(B_t / t): t times the product of its operands' means, the
ANN's product of the values the operands encode. That rescaling of the running product is one multiply-add per
output element and step, counted as analog work (MACs)."""

import torch

from snnbench.core.stepped import Stepped


class SpikeProduct(Stepped):
    """`a @ b` in the spiking network (torch.matmul of two tensors of at least two dimensions, whose values both
    depend on the input), emitting at each step what makes its output summed up to t equal A_t B_t / t, the
    operands' sums A_t, B_t up to t. Like a neuron, it takes a chunk of `steps` steps folded into the batch
    dimension ([steps x batch, ...]), or an operand constant over the chunk ([batch, ...]).

    `spiking[i]`: whether operand i is a spike train (the output of spiking layers); its term of the product is
    then counted in synaptic operations, one per non-zero entry and element of the other operand it multiplies,
    else in multiply-accumulates (every entry)."""

    def __init__(self, spiking: tuple[bool, bool] = (True, True)):
        super().__init__()
        self.spiking = spiking
        # the counts stay on the module's device, like a neuron's (no copy to the host per chunk)
        self.register_buffer("counts", torch.zeros(3, 0, dtype=torch.float64), persistent=False)
        self.begin(total_steps=0)

    @classmethod
    def like(cls, module: "SpikeProduct") -> "SpikeProduct":
        return cls(module.spiking)

    def begin(self, total_steps: int):
        """Start a new sample batch: clear the running sums and the per-step counters (summed over the samples:
        the operands' non-zero entries where they are spike trains, i.e. the events arriving, synaptic operations,
        multiply-accumulates), which stay on the module's device."""
        self.t = 0
        self.a_sum = self.b_sum = None  # the operands' running sums A_t, B_t [batch (x windows), ...]
        self.product = None             # A_t B_t
        self.emitted = None             # the output summed so far: A_t B_t / t
        self.counts = torch.zeros(3, total_steps, dtype=torch.float64, device=self.counts.device)
        self.events, self.synaptic_ops, self.macs = self.counts

    def extra_repr(self) -> str:
        return f"spiking={self.spiking}"

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        steps = self.steps
        if a.dim() < 2 or b.dim() < 2:
            raise ValueError("SpikeProduct multiplies matrices (operands of at least two dimensions)")
        a, b = self.per_step(a, 0), self.per_step(b, 1)
        leading = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a, b = a.expand(*leading, *a.shape[-2:]), b.expand(*leading, *b.shape[-2:])
        if self.a_sum is None:
            self.a_sum, self.b_sum = torch.zeros_like(a[0]), torch.zeros_like(b[0])
            self.product = a.new_zeros(*leading[1:], a.shape[-2], b.shape[-1])
            self.emitted = torch.zeros_like(self.product)
        a_sums = self.a_sum + a.cumsum(0)                          # A_t at each step of the chunk
        b_sums = self.b_sum + b.cumsum(0)                          # B_t
        a_before = torch.cat([self.a_sum.unsqueeze(0), a_sums[:-1]])  # A_{t−1}
        products = self.product + (a @ b_sums + a_before @ b).cumsum(0)  # A_t B_t
        t = torch.arange(self.t + 1, self.t + steps + 1, dtype=products.dtype, device=products.device)
        emitted = products / t.view(-1, *[1] * (products.dim() - 1))
        out = emitted - torch.cat([self.emitted.unsqueeze(0), emitted[:-1]])
        self.counts[:, self.t:self.t + steps] += self._work(a, b)
        self.a_sum, self.b_sum, self.product, self.emitted = a_sums[-1], b_sums[-1], products[-1], emitted[-1]
        self.t += steps
        return out.flatten(0, 1)

    def _work(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The events, synaptic operations and multiply-accumulates of each step of the chunk [3, steps], for the
        operands' increments a [steps, batch, ..., M, K] and b [steps, batch, ..., K, N] (broadcast to the same
        leading dimensions)."""
        rows, inner, columns = a.shape[-2], a.shape[-1], b.shape[-1]
        matrices = a[0].numel() // (rows * inner)  # (image, head) pairs of one step
        work = torch.zeros(3, a.shape[0], dtype=torch.float64, device=a.device)
        # a_t B_t: each entry of a_t meets a row of B_t (`columns` elements); A_{t−1} b_t: each entry of b_t a
        # column of A_{t−1} (`rows` elements)
        for operand, other_dimension, spiking in ((a, columns, self.spiking[0]), (b, rows, self.spiking[1])):
            if spiking:
                nonzero = torch.count_nonzero(operand.flatten(1), dim=1).double()
                work[0] += nonzero
                work[1] += nonzero * other_dimension
            else:
                work[2] += matrices * rows * inner * columns
        work[2] += matrices * rows * columns  # the rescaling of the running product to a rate
        return work
