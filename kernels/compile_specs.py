"""What `python -m kernels.compile_check` compiles: every Triton kernel at every shipped configuration.

One function per kernel module (`SPECS` maps the module to it); each returns one dict per (kernel,
shipped configuration) in the format documented in kernels/compile_check.py. Kept here, beside the
check, so the kernel modules hold only their kernels, launchers and custom ops.
"""
from __future__ import annotations

import torch
import triton.language as tl

from kernels.common import tl_dtypes


def ln_linear_specs():
    """Every kernel at its shipped configuration for fp16 / bf16 / fp32 inputs, and for the autocast mix
    (fp32 x, gamma, beta, dx with fp16 / bf16 W, b, y, dy, dW, db), all options on, with row strides
    divisible by 16 (K = 384) and not (K = 404): Triton specialises on that at launch."""
    from kernels import ln_linear as L  # here: a module that fails to import fails only its own specs

    # label -> (dtype of the x side, dtype of the W side, dot dtype, config precision)
    fp = {"fp16": ("*fp16", "*fp16", tl.float16, torch.float16, torch.float16),
          "bf16": ("*bf16", "*bf16", tl.bfloat16, torch.bfloat16, torch.bfloat16),
          "fp32": ("*fp32", "*fp32", tl.float32, torch.float32, torch.float32),
          "x32/fp16": ("*fp32", "*fp16", tl.float16, torch.float32, torch.float16),
          "x32/bf16": ("*fp32", "*bf16", tl.bfloat16, torch.float32, torch.bfloat16)}
    # kernel -> (fn, pointers on the x side, pointers on the W side, fp32 pointers, float scalars)
    kernels = {
        "fwd": (L._layernorm_linear_fwd_kernel, ("X", "LnW", "LnB"), ("W", "B", "Y"), ("Mean", "Rstd"), ("eps",)),
        "bwd_dx": (L._layernorm_linear_bwd_dx_kernel, ("X", "LnW", "LnB", "DX"), ("DY", "W"),
                   ("Mean", "Rstd", "DLnWPartial", "DLnBPartial"), ()),
        "bwd_dw": (L._layernorm_linear_bwd_dw_kernel, ("X", "LnW", "LnB"), ("DY", "DW", "DB"), ("Mean", "Rstd"), ()),
        "bwd_dln": (L._layernorm_linear_bwd_dln_kernel, ("DLnW", "DLnB"), (), ("DLnWPartial", "DLnBPartial"), ()),
    }
    specs = []
    for dname, (x_ptr, w_ptr, tldt, x_dtype, w_dtype) in fp.items():
        for kname, (fn, x_ptrs, w_ptrs, fp32_ptrs, floats) in kernels.items():
            if kname == "bwd_dln" and x_ptr == "*fp32" and w_ptr != "*fp32":
                continue  # touches only the x side: the same compilation as fp32
            cfg = L._config(kname, x_dtype, w_dtype)
            consts = dict(HAS_LN_WEIGHT=True, HAS_LN_BIAS=True, HAS_BIAS=True, ACC_DTYPE=tl.float32,
                          DOT_DTYPE=tldt, INPUT_PRECISION="ieee",
                          **{k: v for k, v in cfg.items() if k.isupper()})
            consts = {k: v for k, v in consts.items() if k in fn.arg_names}
            sig = {a: "i32" for a in fn.arg_names}
            sig.update({p: x_ptr for p in x_ptrs})
            sig.update({p: w_ptr for p in w_ptrs})
            sig.update({p: "*fp32" for p in fp32_ptrs})
            sig.update({f: "fp32" for f in floats})
            sig.update({c: "constexpr" for c in consts})
            label = ",".join(f"{k}={v}" for k, v in cfg.items() if k.startswith("BLOCK") or k == "GROUP_M")
            strides = [a for a in fn.arg_names if a.startswith("stride")]
            for aligned in (True, False) if strides else (True,):
                specs.append({
                    "name": f"layernorm_linear_{kname}", "fn": fn, "signature": sig, "constexprs": consts,
                    "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                    "config": f"{dname} {label} w{cfg['num_warps']}s{cfg['num_stages']} "
                              f"{'K%16=0' if aligned else 'K=404'}",
                    "expect_wgmma": w_dtype != torch.float32 and kname != "bwd_dln",
                    # base pointers are 16-byte aligned (torch allocations); row strides depend on K
                    "aligned": list(x_ptrs + w_ptrs + fp32_ptrs) + (strides if aligned else []),
                })
    return specs


def embedding_specs():
    """Both kernels at their shipped configuration, at the DINO-WM shapes (Dp 3, Da 45, Ep = Ea = 10)."""
    from kernels import embedding as E  # here: a module that fails to import fails only its own specs

    small = E._small_blocks(3, 45, 10, 10)
    specs = []
    for dname, ptr in (("fp16", "*fp16"), ("bf16", "*bf16"), ("fp32", "*fp32")):
        for kname, fn, cfg, ptrs, extra in (
            ("fwd", E._tiled_embedding_fwd_kernel, E.FWD_CONFIG,
             {"Visual": ptr, "Proprio": ptr, "Action": ptr, "Wp": ptr, "Bp": ptr, "Wa": ptr, "Ba": ptr,
              "Out": ptr}, {}),
            ("bwd", E._tiled_embedding_bwd_kernel, E.BWD_CONFIG,
             {"DOut": ptr, "Wp": ptr, "Wa": ptr, "DPe": "*fp32", "DAe": "*fp32", "DProprio": ptr, "DAction": ptr},
             {}),
        ):
            consts = dict(ACC_DTYPE=tl.float32, **extra, **small, **{k: v for k, v in cfg.items() if k.isupper()})
            consts = {k: v for k, v in consts.items() if k in fn.arg_names}
            sig = {a: "i32" for a in fn.arg_names}
            sig.update(ptrs)
            sig.update({c: "constexpr" for c in consts})
            label = ",".join(f"{k}={v}" for k, v in cfg.items() if k.startswith("BLOCK"))
            specs.append({"name": f"tiled_embedding_{kname}", "fn": fn, "signature": sig, "constexprs": consts,
                          "num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"],
                          "config": f"{dname} {label} w{cfg['num_warps']}s{cfg['num_stages']}",
                          "aligned": [a for a in ptrs] + [a for a in ("stride_v_f", "stride_v_p") if a in fn.arg_names]})
    return specs


def attention_specs() -> list[dict]:
    """Every kernel x shipped configuration (head dims 24/32/64 x fp16/bf16 x RoPE x dropout), in the
    format of kernels/compile_check.py: ASTSource signature/constexprs plus launch options."""
    from kernels import attention as A  # here: a module that fails to import fails only its own specs

    specs = []
    for head_dim in A.HEAD_DIMS:
        for torch_dtype in A.CHECKED_DTYPES:
            dtype = {torch.float16: "fp16", torch.bfloat16: "bf16"}[torch_dtype]
            ptr = f"*{dtype}"
            for has_rope in (False, True):
                for has_dropout in (False, True):
                    cfg = A.config_for(head_dim, has_dropout)
                    label = f"d{head_dim},{dtype},rope={int(has_rope)},dropout={int(has_dropout)}"
                    for name, fn, tensors, floats, (bm, bn, warps, stages) in (
                        ("attn_fwd", A._attn_fwd_kernel, ("Q", "K", "V", "Out"), ("qk_scale", "dropout_p"), cfg.fwd),
                        ("attn_bwd_dkdv", A._attn_bwd_dkdv_kernel, ("Q", "K", "V", "DO", "DK", "DV"),
                         ("sm_scale", "qk_scale", "dropout_p"), cfg.dkdv),
                        ("attn_bwd_dq", A._attn_bwd_dq_kernel, ("Q", "K", "V", "DO", "DQ"),
                         ("sm_scale", "qk_scale", "dropout_p"), cfg.dq),
                    ):
                        constexprs = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=A._pad_head_dim(head_dim), BLOCK_M=bm,
                                          BLOCK_N=bn, HAS_ROPE=has_rope, HAS_DROPOUT=has_dropout,
                                          DOT=tl_dtypes()[torch_dtype],
                                          ACC=tl.float32, PRECISION="tf32")
                        signature = {}
                        for arg in fn.arg_names:
                            if arg in constexprs:
                                signature[arg] = "constexpr"
                            elif arg in tensors:
                                signature[arg] = ptr
                            elif arg in ("Cos", "Sin", "Lse", "Delta"):
                                signature[arg] = "*fp32"
                            elif arg == "Seed":
                                signature[arg] = "*i64"
                            elif arg[0].isupper():
                                signature[arg] = "*i32"  # frame ids and tile lists
                            elif arg in floats:
                                signature[arg] = "fp32"
                            else:
                                signature[arg] = "i32"  # strides and sizes
                        pointers = [a for a, t in signature.items() if t.startswith("*")]
                        strides = [a for a in fn.arg_names if a.startswith("stride_")] if head_dim % 16 == 0 else []
                        specs.append({"name": name, "fn": fn, "signature": signature, "constexprs": constexprs,
                                      "num_warps": warps, "num_stages": stages, "config": label,
                                      "expect_wgmma": True, "aligned": pointers + strides})
            specs.append({
                "name": "rope", "fn": A._rope_kernel, "config": f"d{head_dim},{dtype}", "num_warps": A.ROPE_WARPS, "num_stages": 1,
                "signature": {"X": ptr, "Cos": "*fp32", "Sin": "*fp32", "Out": ptr, "stride_xb": "i32",
                              "stride_xh": "i32", "stride_xn": "i32", "n_heads": "i32", "n_ctx": "i32",
                              "HEAD_DIM": "constexpr", "HEAD_DIM_PAD": "constexpr", "BLOCK": "constexpr",
                              "ACC": "constexpr"},
                "constexprs": {"HEAD_DIM": head_dim, "HEAD_DIM_PAD": A._pad_head_dim(head_dim), "BLOCK": A.ROPE_BLOCK,
                               "ACC": tl.float32},
                "aligned": ["X", "Cos", "Sin", "Out"],
            })
    return specs


# kernel module -> its specs
SPECS = {"kernels.ln_linear": ln_linear_specs, "kernels.embedding": embedding_specs,
         "kernels.attention": attention_specs}
