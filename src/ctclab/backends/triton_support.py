"""What ctclab's Triton backends need to know about Triton, without importing it early.

Triton is optional (the ``gpu`` extra; PyTorch's CUDA wheels ship it). Its interpreter
(``TRITON_INTERPRET=1``) runs ``@triton.jit`` kernels on CPU tensors, which is how the tests
check the kernels on a machine without a GPU; the variable must be set before ``triton`` is first
imported, so nothing here imports it except :func:`compile_for_hopper`.

:func:`compile_for_hopper` compiles a kernel for sm_90 (H100/H200) on any machine — no GPU or
CUDA driver needed: Triton ships ``ptxas`` — and reads the resources the compiled kernel uses
(registers, spills, shared memory). Code that the interpreter accepts but the compiler rejects
(``break`` in a loop, a variable whose type changes across an ``if``) fails there.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

#: sm_90: Hopper (H100/H200), 32 threads a warp.
HOPPER = ("cuda", 90, 32)


@functools.cache
def available() -> bool:
    """Whether ``triton`` can be imported (checked without importing it; once: the registry asks
    on every call, and the file-system search cost ~0.1 ms a call)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton kernels run in its interpreter (``TRITON_INTERPRET`` set truthy): on CPU
    tensors, one program after another."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def runs_on(device_type: str) -> bool:
    """Whether ctclab's Triton kernels can run on tensors of ``device_type`` in this process:
    CUDA tensors with Triton compiled, CPU tensors under the interpreter."""
    if not available():
        return False
    if device_type == "cpu":
        return interpreting()
    return device_type == "cuda" and not interpreting()


@dataclass(frozen=True)
class KernelResources:
    """What one compiled kernel uses on the target, per thread unless said otherwise.

    Attributes:
        name: the kernel's name.
        arch: the target, e.g. ``'sm90'``.
        num_warps: warps per program.
        registers: 32-bit registers per thread (255 at most; more spill).
        spill_bytes: local memory per thread (``LOCAL`` in ``cuobjdump -res-usage``): where
            ``ptxas`` spills registers; 0 for a kernel that fits.
        stack_bytes: stack frame per thread.
        shared_bytes: shared memory per program (Triton's scratch for shuffles, reductions).
    """

    name: str
    arch: str
    num_warps: int
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int

    def __str__(self) -> str:
        return (f"{self.name} ({self.arch}, {self.num_warps} warps): {self.registers} registers, "
                f"{self.spill_bytes} B spilled, {self.stack_bytes} B stack, {self.shared_bytes} B shared")


def compile_for_hopper(kernel, signature: dict, constexprs: dict | None = None, *, num_warps: int = 4,
                       num_stages: int = 1) -> KernelResources:
    """Compile ``kernel`` for sm_90 and read its resource use; no GPU needed.

    Args:
        kernel: a ``@triton.jit`` function defined at a module's top level.
        signature: Triton's type of every argument by name (``'*fp32'``, ``'*i64'``, ``'i32'``,
            ``'fp32'``, ``'constexpr'``).
        constexprs: the value of every ``constexpr`` argument by name.
        num_warps, num_stages: the launch options the kernel will get.

    Under the interpreter the kernel in this process is an interpreted function that Triton's
    compiler cannot read; the compilation then runs in a fresh Python with the interpreter off
    (:func:`compile_many` compiles several in one).

    Raises:
        RuntimeError: the kernel does not compile (the message carries the compiler's).
    """
    return compile_many([Compilation(kernel, signature, constexprs or {}, num_warps, num_stages)])[0]


@dataclass(frozen=True)
class Compilation:
    """One kernel to compile: the arguments of :func:`compile_for_hopper`."""

    kernel: object
    signature: dict
    constexprs: dict
    num_warps: int = 4
    num_stages: int = 1


def compile_many(jobs: list[Compilation]) -> list[KernelResources]:
    """:func:`compile_for_hopper` of each job, in one subprocess under the interpreter (each
    start of Python with torch and Triton costs seconds)."""
    requests = []
    for job in jobs:
        fn = getattr(job.kernel, "fn", job.kernel)
        requests.append({"module": fn.__module__, "name": fn.__name__, "signature": job.signature,
                         "constexprs": dict(job.constexprs), "num_warps": job.num_warps, "num_stages": job.num_stages})
    if not interpreting():
        return [_compile_request(request) for request in requests]
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    code = "import json, sys; from ctclab.backends.triton_support import _compile_request; " \
           "print(json.dumps([_compile_request(r).__dict__ for r in json.load(sys.stdin)]))"
    done = subprocess.run([sys.executable, "-c", code], input=json.dumps(requests), env=env,
                          capture_output=True, text=True)
    if done.returncode != 0:
        names = ", ".join(r["name"] for r in requests)
        raise RuntimeError(f"{names}: a kernel does not compile for sm_90:\n{done.stderr[-4000:]}")
    return [KernelResources(**fields) for fields in json.loads(done.stdout.strip().splitlines()[-1])]


def _compile_request(request: dict) -> KernelResources:
    """One compilation of :func:`compile_many`, in a process without the interpreter."""
    import importlib

    kernel = getattr(importlib.import_module(request["module"]), request["name"])
    return _compile(kernel, request["signature"], request["constexprs"], request["num_warps"], request["num_stages"])


def _compile(kernel, signature, constexprs, num_warps, num_stages) -> KernelResources:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource

    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    try:
        compiled = triton.compile(source, target=GPUTarget(*HOPPER),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as error:  # the compiler's own exception types vary by stage
        raise RuntimeError(f"{kernel.fn.__name__} does not compile for sm_90: {error}") from error
    usage = _resource_usage(compiled.asm["cubin"], os.path.dirname(get_ptxas(HOPPER[1]).path))
    return KernelResources(name=compiled.metadata.name, arch=compiled.metadata.arch, num_warps=num_warps,
                           registers=usage["REG"], spill_bytes=usage["LOCAL"], stack_bytes=usage["STACK"],
                           shared_bytes=compiled.metadata.shared)


def _resource_usage(cubin: bytes, tools: str) -> dict:
    """``cuobjdump -res-usage`` of a cubin (the tool ships with Triton next to ``ptxas``)."""
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "kernel.cubin")
        with open(path, "wb") as file:
            file.write(cubin)
        report = subprocess.run([os.path.join(tools, "cuobjdump"), "-res-usage", path], capture_output=True,
                                text=True, check=True).stdout
    return {key: int(value) for key, value in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", report)}
