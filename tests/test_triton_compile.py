"""ctclab's Triton kernels compiled for Hopper (sm_90) without a GPU (ctclab.backends.triton_support):
code the interpreter accepts but the compiler rejects fails here; register use and spills are
reported (run with -s to see them) and recorded in the test's output."""
import pytest

from ctclab.backends import triton_support

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not triton_support.available(), reason="triton is not installed"),
]

SCORES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16", "float64": "*fp64"}


def _graph_signature(acc: str) -> dict:
    return {"labels_ptr": "*i32", "moves_ptr": acc, "entry_ptr": acc, "flags_ptr": "*i32",
            "input_lengths_ptr": "*i32", "num_states_ptr": "*i32"}


def _forward(scores: str, acc: str) -> dict:
    return {"lp_ptr": scores, "stride_lt": "i32", "stride_lb": "i32", "stride_lc": "i32", **_graph_signature(acc),
            "alpha_ptr": acc, "rows": "i32", "nll_ptr": acc, "B": "i32", "W": "i32", "delay": "fp32",
            "BLOCK": "constexpr"}


def _backward(scores: str, acc: str) -> dict:
    return {"lp_ptr": scores, "stride_lt": "i32", "stride_lb": "i32", "stride_lc": "i32", **_graph_signature(acc),
            "alpha_ptr": acc, "rows": "i32", "nll_ptr": acc, "upstream_ptr": acc, "gamma_ptr": acc,
            "stride_gt": "i32", "stride_gb": "i32", "S": "i32", "order_ptr": "*i32", "sorted_ptr": "*i32",
            "segment_ptr": "*i32",
            "grad_ptr": scores, "stride_dt": "i32", "stride_db": "i32", "stride_dc": "i32", "B": "i32", "W": "i32",
            "C": "i32", "delay": "fp32", "BLOCK": "constexpr", "LOG_BLOCK": "constexpr",
            "GRADIENT": "constexpr"}


# (kernel, scores dtype, BLOCK, extra constexprs, warps): the largest tile the backend picks in
# each dtype, and the smallest in float32 (each compilation costs seconds: one of each kind)
CASES = [("ctc_forward_kernel", dtype, 1024, {}, 8) for dtype in ("float32", "bfloat16", "float64")] + [
    ("ctc_forward_kernel", "float32", 128, {}, 4),
    ("ctc_backward_kernel", "float32", 128, {"GRADIENT": True}, 4),
    ("ctc_backward_kernel", "bfloat16", 1024, {"GRADIENT": True}, 8),
] + [("ctc_backward_kernel", dtype, 1024, {"GRADIENT": gradient}, 8) for dtype in ("float32", "float64")
     for gradient in (True, False)]


@pytest.fixture(scope="module")
def compiled():
    """Every case compiled in one go (one subprocess under the interpreter)."""
    from ctclab.backends import triton_kernels

    jobs = []
    for name, dtype, block, extra, warps in CASES:
        acc = "*fp64" if dtype == "float64" else "*fp32"
        signature = (_forward if name == "ctc_forward_kernel" else _backward)(SCORES[dtype], acc)
        constexprs = {"BLOCK": block, **extra}
        if name == "ctc_backward_kernel":
            constexprs["LOG_BLOCK"] = block.bit_length() - 1
        jobs.append(triton_support.Compilation(getattr(triton_kernels, name), signature, constexprs, warps))
    return dict(zip(range(len(CASES)), triton_support.compile_many(jobs)))


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c[0]}-{c[1]}-BLOCK{c[2]}-{c[3]}" for c in CASES])
def test_kernel_compiles_for_sm90_without_spills(compiled, case):
    resources = compiled[case]
    print(CASES[case][1], CASES[case][3], resources)
    assert resources.arch == "sm90" and resources.num_warps == CASES[case][4]
    assert 0 < resources.registers <= 255
    assert resources.spill_bytes == 0, resources


def test_a_kernel_the_compiler_rejects_fails_with_its_message(tmp_path, monkeypatch):
    """What the check exists for: `break` in a loop runs in the interpreter but does not compile."""
    (tmp_path / "rejected_kernel.py").write_text(
        "import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef rejected(x_ptr, n):\n"
        "    for i in range(n):\n        if i > 2:\n            break\n        tl.store(x_ptr + i, i)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    import rejected_kernel

    with pytest.raises(RuntimeError, match="does not compile for sm_90"):
        triton_support.compile_for_hopper(rejected_kernel.rejected, {"x_ptr": "*i32", "n": "i32"})


@pytest.mark.parametrize("dtype", ["*fp32", "*fp64"])
def test_the_research_paths_fused_step_compiles_for_sm90_without_spills(dtype):
    """ctclab.backends.triton_step's two kernels (impl='autograd' on CUDA), at the block size it launches."""
    from ctclab.backends import triton_step

    pointers = {"alpha_ptr": dtype, "weights_ptr": dtype, "out_ptr": dtype}
    sizes = {"BS": "i32", "S": "i32", "floor": "fp32", "BLOCK": "constexpr"}
    jobs = [triton_support.Compilation(triton_step.log_transition_kernel, {**pointers, **sizes},
                                       {"BLOCK": triton_step.BLOCK}, 4),
            triton_support.Compilation(triton_step.log_transition_backward_kernel,
                                       {**pointers, "g_ptr": dtype, "grad_ptr": dtype, **sizes},
                                       {"BLOCK": triton_step.BLOCK}, 4)]
    for resources in triton_support.compile_many(jobs):
        print(dtype, resources)
        assert resources.arch == "sm90" and 0 < resources.registers <= 255 and resources.spill_bytes == 0, resources
