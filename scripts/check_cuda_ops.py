"""Checks that every convbn operator with a CPU kernel also runs on CUDA: it
has a CUDA kernel registered, or a composite kernel (which runs on any
device). No GPU is needed: this reads the dispatcher's registrations.

    python3 scripts/check_cuda_ops.py [LIBRARY]

LIBRARY: a built convbn/_C*.so, loaded with torch.ops.load_library; without
it, `import convbn` (PYTHONPATH=python for the tree's package). Prints one
line per operator; exits 1 if one is missing on CUDA.
"""

import sys

import torch

COMPOSITE_KEYS = ("CompositeImplicitAutograd", "CompositeExplicitAutograd", "CompositeExplicitAutogradNonFunctional")


def main(argv):
    if len(argv) > 1:
        torch.ops.load_library(argv[1])
        loaded = argv[1]
    else:
        import convbn

        loaded = convbn.__file__
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("convbn::"))
    print(f"convbn operators registered by {loaded} (torch {torch.__version__}, CUDA {torch.version.cuda}):")
    if not names:
        print("  none")
        return 1
    missing = []
    print(f"  {'operator':<40} {'CPU':<10} CUDA")
    for name in names:
        composite = any(has(name, key) for key in COMPOSITE_KEYS)
        cpu = "kernel" if has(name, "CPU") else "composite" if composite else "-"
        cuda = "kernel" if has(name, "CUDA") else "composite" if composite else "-"
        if cpu != "-" and cuda == "-":
            missing.append(name)
            cuda = "MISSING"
        print(f"  {name:<40} {cpu:<10} {cuda}")
    covered = sum(1 for name in names if name not in missing)
    if missing:
        print(f"CUDA coverage: FAILED, {len(missing)} of {len(names)} operators have a CPU kernel and no CUDA one: "
              + ", ".join(missing))
        return 1
    print(f"CUDA coverage: ok, {covered} of {len(names)} operators run on CUDA (kernel or composite)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
