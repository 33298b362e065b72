"""Times optax.ctc_loss (fwd+bwd w.r.t. logits, under jax.jit) on saved inputs; run by
optax_vs_torch.py with an interpreter that has jax and optax."""
import json
import statistics
import sys
import time

import numpy as np


def main():
    import jax
    import jax.numpy as jnp
    import optax

    data_path, repeats, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    data = np.load(data_path)
    logits = jnp.asarray(np.transpose(data["logits"], (1, 0, 2)))  # (B, T, C)
    B, T, C = logits.shape
    L = data["targets"].shape[1]
    logit_paddings = jnp.asarray((np.arange(T)[None] >= data["input_lengths"][:, None]).astype(np.float32))
    labels = jnp.asarray(data["targets"].astype(np.int32))
    label_paddings = jnp.asarray((np.arange(L)[None] >= data["target_lengths"][:, None]).astype(np.float32))

    @jax.jit
    def step(x):
        return jax.value_and_grad(lambda z: optax.ctc_loss(z, logit_paddings, labels, label_paddings, blank_id=0).sum())(x)

    loss, grad = step(logits)
    jax.block_until_ready(grad)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss, grad = step(logits)
        jax.block_until_ready(grad)
        times.append(time.perf_counter() - t0)
    json.dump({"median_s": statistics.median(times), "loss": float(loss)}, open(out_path, "w"))


if __name__ == "__main__":
    main()
