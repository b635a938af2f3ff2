"""Throughput, activation memory and scaling of CrossFormer, as ratios measured in one run.

    python benchmarks/benchmark.py                       # all sections, CPU, fp32
    python benchmarks/benchmark.py --sections eval --models crossformer_s crossformer_t
    python benchmarks/benchmark.py --device cuda --batch 128 --amp bf16 --compile
    python benchmarks/benchmark.py --sections deploy --batch 1    # vs onnxruntime, OpenVINO: needs .[bench]
    python benchmarks/benchmark.py --sections products --batch 1  # where packed oneDNN products pay
    python benchmarks/benchmark.py --sections speedups --models crossformer_t crossformer_s --against 94ab3d2
    python benchmarks/benchmark.py --sections tuning --models crossformer_t crossformer_s  # what tuning costs
    python benchmarks/benchmark.py --sections shapes --models crossformer_t crossformerpp_s
    python benchmarks/benchmark.py --sections export --batch 2 --models crossformer_t  # torch.export seconds

Every timing is the median over ``--rounds`` interleaved rounds (each contender once per
round, in turn), so slow drift of the machine hits all of them alike. Baselines:

- ``explicit``: ``crossformer.set_speedups(model, False)``, every layer's definition: explicit
  matmul-softmax-matmul attention, no bias cache, no token chunks, lean MLP or space-to-depth stem;
- ``swin_tiny``: timm's ``swin_tiny_patch4_window7_224`` (fused attention), same input.

The deploy section runs the same weights as our eager fp32, ``model.to(torch.bfloat16)``,
fp32 under bf16 autocast, ``torch.compile`` (default, with inductor's freezing, and of the bf16
model) and our own
ONNX export in onnxruntime and OpenVINO, against the host's best matrix product of each dtype:
the faster of torch's default and oneDNN with a packed weight (for bf16 on a host without bf16
products, the fp32 one too: bf16 then runs fp32 products).

The eval section also reports the fraction of the host's matmul peak the model reaches: its
FLOPs per second (2 x GMACs) over those of one large fp32 (or ``--amp`` dtype) matrix product,
the faster of torch's default and (on the CPU) oneDNN with a packed weight, as the deploy section.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List

import timm
import torch

from crossformer import set_speedups
from crossformer.layers.speedups import tuned_choices
from crossformer.layers.speedups.tuning import token_bucket
from crossformer.info import count_gmacs
from crossformer.models.crossformer import PAPER_RESULTS

SWIN = 'swin_tiny_patch4_window7_224'


def explicit(model: torch.nn.Module) -> torch.nn.Module:
    """A CrossFormer with every speed-up off: each layer runs its definition."""
    return set_speedups(model, False)


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize()


def interleaved(fns: Dict[str, Callable[[], None]], rounds: int, device: torch.device) -> Dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds after one warm-up."""
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def gmacs(model: torch.nn.Module, size: int = 224) -> float:
    """Multiply-accumulates of one image; explicit attention, since the counter misses SDPA's CPU kernel."""
    if hasattr(model, 'layers') and hasattr(model, 'patch_embed'):
        explicit(model)
    return count_gmacs(model.eval(), (size, size))


def autocast(args, device):
    if args.amp == 'none':
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, {'bf16': 'bfloat16', 'fp16': 'float16'}[args.amp]))


def build(name: str, device: torch.device, compile_model: bool, train: bool = False) -> torch.nn.Module:
    model = timm.create_model(name).to(device).train(train)
    return torch.compile(model) if compile_model else model


def section_eval(args, device):
    print(f'\n## eval: batch {args.batch}, {args.size}x{args.size}, {device}, amp {args.amp}'
          f'{", compiled" if args.compile else ""}; img/s (median of {args.rounds} interleaved rounds)')
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    swin = build(SWIN, device, args.compile)
    swin_gmacs = gmacs(timm.create_model(SWIN), args.size) if args.size == 224 else float('nan')
    dtype = {'none': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}[args.amp]
    peak = max(best_matmul_flops(dtype, device, n=2048).values())
    print(f'host matmul peak ({dtype}, the faster of torch\'s default and oneDNN): {peak / 1e9:.0f} GFLOP/s')
    print(f'| model | img/s | vs explicit | img/s per GMAC vs {SWIN} | of matmul peak |')
    print('|---|---:|---:|---:|---:|')
    for name in args.models:
        fused, plain = build(name, device, args.compile), explicit(build(name, device, args.compile))
        fns = {'fused': lambda: fused(x), 'explicit': lambda: plain(x), 'swin': lambda: swin(x)}
        with torch.inference_mode(), autocast(args, device):
            t = interleaved(fns, args.rounds, device)
        g = gmacs(timm.create_model(name), args.size)
        per_gmac = (t['swin'] * swin_gmacs) / (t['fused'] * g)
        of_peak = 2 * g * 1e9 * args.batch / t['fused'] / peak
        print(f'| {name} | {args.batch / t["fused"]:.1f} | {t["explicit"] / t["fused"]:.2f}x | {per_gmac:.2f}x '
              f'| {100 * of_peak:.0f}% |')
    swin_peak = 2 * swin_gmacs * 1e9 * args.batch / t['swin'] / peak
    print(f'| {SWIN} | {args.batch / t["swin"]:.1f} | | 1.00x | {100 * swin_peak:.0f}% |')


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward during one forward (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).float().sum().backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def section_train(args, device):
    batch = max(args.batch // 2, 1)
    print(f'\n## train step (forward + backward + AdamW), batch {batch}, {args.size}x{args.size}, amp {args.amp}')
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    for name in args.models:
        models = {'fused': build(name, device, False, True), 'explicit': explicit(build(name, device, False, True)),
                  'fused+ckpt': build(name, device, False, True)}
        models['fused+ckpt'].set_grad_checkpointing(True)
        opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-5) for k, m in models.items()}

        def step(k):
            def run():
                with autocast(args, device):
                    loss = torch.nn.functional.cross_entropy(models[k](x), y)
                loss.backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)
            return run

        t = interleaved({k: step(k) for k in models}, args.rounds, device)
        with autocast(args, device):
            mem = {k: saved_activation_bytes(m, x) for k, m in models.items()}
        print(f'| {name} | img/s | vs explicit | activations kept for backward | vs explicit |')
        print('|---|---:|---:|---:|---:|')
        for k in models:
            print(f'| {k} | {batch / t[k]:.2f} | {t["explicit"] / t[k]:.2f}x | {mem[k] / 2**20:.0f} MiB '
                  f'| {mem[k] / mem["explicit"]:.2f}x |')


def section_scaling(args, device):
    name = args.models[0]
    print(f'\n## dense features of {name} by image size (batch 1): time per megapixel')
    fused, plain = build(name, device, False), explicit(build(name, device, False))
    rows = []
    for size in args.scaling_sizes:
        x = torch.randn(1, 3, size, size, device=device)
        fns = {'fused': lambda: fused.forward_intermediates(x, intermediates_only=True),
               'explicit': lambda: plain.forward_intermediates(x, intermediates_only=True)}
        with torch.inference_mode(), autocast(args, device):
            t = interleaved(fns, args.rounds, device)
        rows.append((size, t))
    base = rows[0][1]['fused'] / rows[0][0] ** 2
    print('| size | fused ms | per pixel vs smallest | explicit / fused |')
    print('|---|---:|---:|---:|')
    for size, t in rows:
        print(f'| {size} | {t["fused"] * 1e3:.0f} | {t["fused"] / size ** 2 / base:.2f}x | {t["explicit"] / t["fused"]:.2f}x |')


# Peak resident memory of one forward, in a fresh process: the model is built and warmed up on a
# 32x32 image, the resident peak (VmHWM) is reset to the resident size through /proc/self/clear_refs,
# then the image runs once. What the allocator kept from earlier inputs cannot hide the peak.
PEAK_PROBE = r'''
import sys, timm, torch, crossformer
name, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def status(key):
    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(key)) / 1024
model = timm.create_model(name).eval()
with torch.inference_mode():
    model(torch.randn(1, 3, 32, 32))
    x = torch.randn(1, 3, h, w)
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    before = status('VmRSS')
    model(x)
    print(status('VmHWM') - before, status('VmRSS') - before)
'''


def peak_mib(name: str, h: int, w: int, device: torch.device) -> float:
    """Peak memory of one eval forward of an ``h x w`` image above the warmed-up model: the CUDA
    allocator's peak, or on CPU the resident peak of a fresh process (Linux)."""
    if device.type == 'cuda':
        model = timm.create_model(name).to(device).eval()
        x = torch.randn(1, 3, h, w, device=device)
        with torch.inference_mode():
            model(x[..., :32, :32])
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model(x)
            torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    out = subprocess.run([sys.executable, '-c', PEAK_PROBE, name, str(h), str(w)], check=True, capture_output=True,
                         text=True)
    return float(out.stdout.split()[-2])


def section_shapes(args, device):
    print(f'\n## strips and panoramas next to the square of the same pixel count (batch 1, eval, {device}):'
          f' time of the strip / time of the square (median of {args.rounds} interleaved rounds); peak memory'
          f' of one forward above the warmed-up model')
    print('| model | strip | square | strip ms | square ms | time ratio | strip peak MiB | square peak MiB |')
    print('|---|---|---|---:|---:|---:|---:|---:|')
    for name in args.models:
        model = build(name, device, args.compile)
        for shape in args.shapes:
            h, w = (int(v) for v in shape.split('x'))
            side = round((h * w) ** 0.5)
            strip = torch.randn(1, 3, h, w, device=device)
            square = torch.randn(1, 3, side, side, device=device)
            fns = {'strip': lambda: model(strip), 'square': lambda: model(square)}
            with torch.inference_mode(), autocast(args, device):
                t = interleaved(fns, args.rounds, device)
            peak = {k: peak_mib(name, *size, device) for k, size in (('strip', (h, w)), ('square', (side, side)))}
            print(f'| {name} | {h}x{w} | {side}x{side} | {t["strip"] * 1e3:.0f} | {t["square"] * 1e3:.0f} '
                  f'| {t["strip"] / t["square"]:.2f}x | {peak["strip"]:.0f} | {peak["square"]:.0f} |', flush=True)


def section_gmacs(args, device):
    print('\n## GMACs at 224 (torch.utils.flop_counter: matmuls and convolutions) next to the paper')
    print('| model | GMACs | paper GFLOPs |')
    print('|---|---:|---:|')
    for name, paper in PAPER_RESULTS.items():
        print(f'| {name} | {gmacs(timm.create_model(name)):.2f} | {paper["gflops"]} |')


# ---- deploy: our eager and compiled paths next to onnxruntime and OpenVINO on our ONNX export --

DEPLOY_CONTENDERS = ['eager', 'bf16', 'autocast-bf16', 'compile', 'compile-freezing', 'compile-bf16',
                     'compile-freezing-bf16', 'onnxruntime', 'openvino', 'openvino-bf16']


def best_matmul_flops(dtype: torch.dtype, device: torch.device = torch.device('cpu'), n: int = 1024,
                      rounds: int = 5) -> Dict[str, float]:
    """FLOP/s of an ``n x n`` product in ``dtype`` through torch's default path and, on the CPU,
    through oneDNN with a packed weight (where the host packs that dtype), interleaved."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    fns = {'torch': lambda: torch.nn.functional.linear(a, b)}
    try:
        if device.type == 'cpu':
            packed = torch.ops.mkldnn._reorder_linear_weight(b, None)
            fns['onednn'] = lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, 'none', [], '')
    except RuntimeError:  # e.g. bf16 packing needs AVX512-BF16 or AVX-NE-CONVERT
        pass
    with torch.inference_mode():
        t = interleaved(fns, rounds, device)
    return {k: 2 * n ** 3 / v for k, v in t.items()}


def onnx_export(model: torch.nn.Module, path: str) -> None:
    torch.onnx.export(model, torch.randn(1, 3, 224, 224), path, dynamo=False, opset_version=17,
                      input_names=['image'], output_names=['logits'],
                      dynamic_axes={'image': {0: 'batch', 2: 'height', 3: 'width'}, 'logits': {0: 'batch'}})


def deploy_runners(name: str, x: torch.Tensor, contenders: List[str], onnx_path: str) -> Dict[str, Callable]:
    """One callable per contender, each returning fp32 logits of ``x`` as a tensor."""
    model = timm.create_model(name).eval()
    threads = torch.get_num_threads()
    runners: Dict[str, Callable] = {}
    if 'eager' in contenders:
        runners['eager'] = lambda: model(x)
    if {'bf16', 'compile-bf16', 'compile-freezing-bf16'} & set(contenders):
        model_bf16 = timm.create_model(name).eval().to(torch.bfloat16)
        model_bf16.load_state_dict(model.state_dict())
        x_bf16 = x.to(torch.bfloat16)
    if 'bf16' in contenders:
        runners['bf16'] = lambda: model_bf16(x_bf16).float()
    if 'autocast-bf16' in contenders:
        def autocast_bf16():
            with torch.autocast('cpu', dtype=torch.bfloat16):
                return model(x).float()
        runners['autocast-bf16'] = autocast_bf16
    if 'compile' in contenders:
        compiled = torch.compile(model)
        runners['compile'] = lambda: compiled(x)
    if 'compile-freezing' in contenders:  # inductor's own oneDNN weight packing; its own backend, its own graph
        compiled_frozen = torch.compile(model, options={'freezing': True})
        runners['compile-freezing'] = lambda: compiled_frozen(x)
    if 'compile-bf16' in contenders:
        compiled_bf16 = torch.compile(model_bf16)
        runners['compile-bf16'] = lambda: compiled_bf16(x_bf16).float()
    if 'compile-freezing-bf16' in contenders:
        compiled_frozen_bf16 = torch.compile(model_bf16, options={'freezing': True})
        runners['compile-freezing-bf16'] = lambda: compiled_frozen_bf16(x_bf16).float()
    missing = [c for c in contenders if c.startswith(('onnxruntime', 'openvino'))
               and importlib.util.find_spec(c.split('-')[0]) is None]
    if missing:
        print(f'left out (pip install -e ".[bench]" adds them): {", ".join(missing)}')
        contenders = [c for c in contenders if c not in missing]
    needs_onnx = [c for c in contenders if c.startswith(('onnxruntime', 'openvino'))]
    if needs_onnx:
        onnx_export(model, onnx_path)
    image = x.numpy()
    if 'onnxruntime' in contenders:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        session = ort.InferenceSession(onnx_path, options, providers=['CPUExecutionProvider'])
        runners['onnxruntime'] = lambda: torch.from_numpy(session.run(None, {'image': image})[0])
    for precision in ('f32', 'bf16'):
        key = 'openvino' if precision == 'f32' else 'openvino-bf16'
        if key not in contenders:
            continue
        import openvino
        core = openvino.Core()
        ov_model = core.read_model(onnx_path)
        ov_model.reshape({'image': list(x.shape)})  # its CPU plugin rejects our dynamic attention shapes
        compiled_ov = core.compile_model(ov_model, 'CPU', {'INFERENCE_NUM_THREADS': threads, 'PERFORMANCE_HINT': 'LATENCY',
                                                           'INFERENCE_PRECISION_HINT': precision})
        actual = compiled_ov.get_property('INFERENCE_PRECISION_HINT')
        if precision == 'bf16' and str(actual) != "<Type: 'bfloat16'>":
            print(f'OpenVINO runs bf16 as {actual} on this host: openvino-bf16 left out')
            continue
        request = compiled_ov.create_infer_request()
        runners[key] = lambda request=request: torch.from_numpy(request.infer({0: image})[0].copy())
    return runners


def section_deploy(args, device):
    if device.type != 'cpu':
        raise SystemExit('the deploy section compares CPU runtimes: use --device cpu')
    import tempfile
    flags = ' '.join(sorted(f for f in ('avx2', 'avx512f', 'avx512_bf16', 'avx512_vnni', 'amx_bf16', 'avx_ne_convert')
                            if f in open('/proc/cpuinfo').read().split())) if os.path.exists('/proc/cpuinfo') else '?'
    print(f'\n## deploy: batch {args.batch}, {args.size}x{args.size}, {torch.get_num_threads()} threads; CPU flags: {flags}; '
          f'torch capability {torch.backends.cpu.get_cpu_capability()}; img/s (median of {args.rounds} interleaved rounds)')
    peaks = {dtype: best_matmul_flops(dtype) for dtype in (torch.float32, torch.bfloat16)}
    bf16_emulated = not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    for dtype, p in peaks.items():
        print(f'{dtype} matmul (1024^3): ' + ', '.join(f'{k} {v / 1e9:.0f} GFLOP/s' for k, v in p.items()))
    x = torch.randn(args.batch, 3, args.size, args.size)
    for name in args.models:
        with tempfile.TemporaryDirectory() as tmp:
            runners = deploy_runners(name, x, args.deploy, os.path.join(tmp, f'{name}.onnx'))
        first, outputs = {}, {}
        with torch.inference_mode():
            for k, fn in runners.items():  # the first call of each: compiles, or tunes the eager paths
                start = time.perf_counter()
                outputs[k] = fn()
                first[k] = time.perf_counter() - start
            diffs = {k: (out - outputs['eager']).abs().max().item() if 'eager' in outputs else float('nan')
                     for k, out in outputs.items()}
            t = interleaved(runners, args.rounds, device)
        g = gmacs(timm.create_model(name), args.size)
        base = t.get('eager', next(iter(t.values())))
        print(f'| {name} | img/s | vs eager | max abs diff of logits | of best matmul of its dtype | first call s |')
        print('|---|---:|---:|---:|---:|---:|')
        for k, v in t.items():
            # bf16 runs its products in fp32 where the host has no bf16 products (the library's speed-ups,
            # OpenVINO's precision hint), so its limit is the faster of the two
            peak = max(peaks[torch.float32].values()) if 'bf16' not in k else max(
                *peaks[torch.bfloat16].values(), *(peaks[torch.float32].values() if bf16_emulated else ()))
            print(f'| {k} | {args.batch / v:.2f} | {base / v:.2f}x | {diffs[k]:.1e} '
                  f'| {2 * g * 1e9 * args.batch / v / peak:.2f} | {first[k]:.1f} |')


# ---- products: oneDNN with a packed weight vs torch's default, at the model's own shapes --------

PRODUCT_TOKENS = (49, 196, 784, 1536)  # stage 4 and 3 of one image; a chunk of tokens


def section_products(args, device):
    """Where packing pays: each Linear shape of the model at several token counts, and each CEL
    convolution at ``--batch``, oneDNN with a packed weight over torch's default, interleaved."""
    from crossformer.layers.speedups.products import linear_product
    print(f'\n## products: oneDNN with a packed weight / torch default, speed ratio (median of {args.rounds} '
          f'interleaved rounds); * = the library\'s tuning chose oneDNN for it on this host')
    for name in args.models:
        model = timm.create_model(name).eval()
        linears = {(m.in_features, m.out_features): m for m in model.modules() if isinstance(m, torch.nn.Linear)
                   and min(m.in_features, m.out_features) >= 16}  # not the DPB's
        print(f'| {name} Linear | ' + ' | '.join(f'{t} tokens' for t in PRODUCT_TOKENS) + ' |')
        print('|---|' + '---:|' * len(PRODUCT_TOKENS))
        for (i, o), layer in sorted(linears.items()):
            packed = torch.ops.mkldnn._reorder_linear_weight(layer.weight.detach(), None)
            cells = []
            for tokens in PRODUCT_TOKENS:
                x = torch.randn(tokens, i)
                with torch.inference_mode():
                    t = interleaved({'torch': lambda: torch.nn.functional.linear(x, layer.weight, layer.bias),
                                     'onednn': lambda: torch.ops.mkldnn._linear_pointwise(
                                         x, packed, layer.bias, 'none', [], '')}, args.rounds, device)
                    linear_product(layer, x)  # tunes it, as a forward would
                chosen = [p for k, p, _ in tuned_choices() if k[:3] == ('linear', i, o) and k[4] == 'none'
                          and k[6] == token_bucket(tokens)]
                cells.append(f'{t["torch"] / t["onednn"]:.2f}{"*" if chosen == ["onednn"] else ""}')
            print(f'| {i} -> {o} | ' + ' | '.join(cells) + ' |')
        convs, inputs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)], {}
        hooks = [m.register_forward_hook(lambda m, a, out, n=n: inputs.__setitem__(n, a[0])) for n, m in convs]
        with torch.inference_mode():
            model(torch.randn(args.batch, 3, args.size, args.size))
        for h in hooks:
            h.remove()
        print(f'| {name} convolution, batch {args.batch} | kernel | torch ms | packed ms | ratio |')
        print('|---|---:|---:|---:|---:|')
        for n, conv in convs:
            x = inputs[n]
            packed = torch.ops.mkldnn._reorder_convolution_weight(conv.weight.detach(), conv.padding, conv.stride,
                                                                 conv.dilation, conv.groups, None)
            with torch.inference_mode():
                t = interleaved({'torch': lambda: conv(x), 'onednn': lambda: torch.ops.mkldnn._convolution_pointwise(
                    x, packed, conv.bias, conv.padding, conv.stride, conv.dilation, conv.groups, 'none', [], '')},
                    args.rounds, device)
            print(f'| {n} | {conv.kernel_size[0]} | {t["torch"] * 1e3:.2f} | {t["onednn"] * 1e3:.2f} '
                  f'| {t["torch"] / t["onednn"]:.2f} |')


# ---- speedups: on against off, and against an earlier commit, on this host -------------------------

def _import_commit(commit: str, tmp: str):
    """The ``crossformer`` package of ``commit``, imported as ``crossformer_old``."""
    import importlib
    import warnings
    repo = subprocess.run(['git', 'rev-parse', '--show-toplevel'], check=True, capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(['git', '-C', repo, 'archive', commit, 'src/crossformer'], check=True,
                             capture_output=True).stdout
    subprocess.run(['tar', '-x', '-C', tmp], input=archive, check=True)
    os.rename(os.path.join(tmp, 'src', 'crossformer'), os.path.join(tmp, 'crossformer_old'))
    sys.path.insert(0, tmp)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # it registers the same timm names
        return importlib.import_module('crossformer_old.models.crossformer')


def section_speedups(args, device):
    """Speed-ups on (tuned on this host) against ``set_speedups(model, False)``, and against the
    ``--against`` commit's eager model, in one process, call by call in turn; fp32, and bf16 where
    the host has bf16 products."""
    import tempfile
    import crossformer.models.crossformer as variants
    if device.type != 'cpu':
        raise SystemExit('the speedups section measures CPU inference: use --device cpu')
    dtypes = [torch.float32] + ([torch.bfloat16] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    print(f'\n## speedups: {torch.get_num_threads()} threads, torch capability {torch.backends.cpu.get_cpu_capability()}'
          f'{", ONEDNN_MAX_CPU_ISA=" + os.environ["ONEDNN_MAX_CPU_ISA"] if "ONEDNN_MAX_CPU_ISA" in os.environ else ""}; '
          f'ms per batch, median of {args.rounds} interleaved rounds'
          f'{"" if len(dtypes) > 1 else " (no bf16 products on this host: fp32 only)"}')
    with tempfile.TemporaryDirectory() as tmp:
        old_module = _import_commit(args.against, tmp) if args.against else None
        print(f'| model | dtype | batch | on ms | off ms | on / off speed | first call ms (tunes) |'
              + (f' {args.against} ms | on / {args.against} speed |' if old_module else ''))
        print('|---|---|---:|---:|---:|---:|---:|' + ('---:|---:|' if old_module else ''))
        for name in args.models:
            for dtype in dtypes:
                on = getattr(variants, name)().eval().to(dtype)  # not timm.create_model: the old commit took the names
                off = explicit(getattr(variants, name)().eval().to(dtype))
                off.load_state_dict(on.state_dict())
                models = {'on': on, 'off': off}
                if old_module:
                    models['old'] = getattr(old_module, name)().eval().to(dtype)
                    models['old'].load_state_dict(on.state_dict())
                for batch in args.speedup_batches:
                    x = torch.randn(batch, 3, args.size, args.size, dtype=dtype)
                    with torch.no_grad():
                        start = time.perf_counter()
                        on(x)
                        first = time.perf_counter() - start
                        diff = max((m(x) - off(x)).abs().max().item() for m in models.values())
                        t = interleaved({k: (lambda m=m: m(x)) for k, m in models.items()}, args.rounds, device)
                    row = (f'| {name} | {str(dtype)[6:]} | {batch} | {t["on"] * 1e3:.1f} | {t["off"] * 1e3:.1f} '
                           f'| **{t["off"] / t["on"]:.2f}x** | {first * 1e3:.0f} |')
                    if old_module:
                        row += f' {t["old"] * 1e3:.1f} | {t["old"] / t["on"]:.2f}x |'
                    print(row + f' <!-- max abs diff {diff:.1e} -->', flush=True)


TUNING_PROBE = r'''
import json, os, sys, time, torch, timm, crossformer
name, batch, size, dtype = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), getattr(torch, sys.argv[4])
torch.manual_seed(0)
model = timm.create_model(name).eval().to(dtype)
x = torch.randn(batch, 3, size, size, dtype=dtype)
times = []
with torch.no_grad():
    for _ in range(4):
        start = time.perf_counter(); model(x); times.append(time.perf_counter() - start)
print(json.dumps(dict(first=times[0], steady=sorted(times[1:])[1])))
'''


def section_tuning(args, device):
    """What tuning costs at a new size: the first call of a fresh process with tuning on, against
    one with ``CROSSFORMER_TUNING=off`` (both pay the process's other first-call costs), in forwards."""
    import tempfile
    print(f'\n## tuning: first call of a fresh process, {torch.get_num_threads()} threads, {args.size}x{args.size}; '
          f'cost = (first call tuning - first call not tuning) / steady call, median of {args.rounds} process pairs')
    print('| model | dtype | batch | steady ms | first call ms, tuning | first call ms, not tuning | cost in forwards |')
    print('|---|---|---:|---:|---:|---:|---:|')
    dtypes = ['float32'] + (['bfloat16'] if torch.ops.mkldnn._is_mkldnn_bf16_supported() else [])
    for name in args.models:
        for dtype in dtypes:
            for batch in args.speedup_batches:
                runs = {'on': [], 'off': []}
                for _ in range(args.rounds):
                    for mode in ('on', 'off'):
                        with tempfile.TemporaryDirectory() as tmp:  # an empty tuning file each time
                            env = dict(os.environ, CROSSFORMER_TUNING_CACHE=tmp,
                                       CROSSFORMER_TUNING='measure' if mode == 'on' else 'off')
                            out = subprocess.run([sys.executable, '-c', TUNING_PROBE, name, str(batch), str(args.size),
                                                  dtype], env=env, check=True, capture_output=True, text=True)
                        runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
                first = {m: statistics.median(r['first'] for r in runs[m]) for m in runs}
                steady = statistics.median(r['steady'] for r in runs['on'] + runs['off'])
                print(f'| {name} | {dtype} | {batch} | {steady * 1e3:.0f} | {first["on"] * 1e3:.0f} '
                      f'| {first["off"] * 1e3:.0f} | **{(first["on"] - first["off"]) / steady:.1f}** |', flush=True)


# ---- export: seconds of torch.export, static and with dynamic batch, height and width ---------

EXPORT_BASELINES = (SWIN, 'convnext_atto')


def section_export(args, device):
    """``torch.export.export`` time of each model at ``--batch`` x ``--size``, static and dynamic
    (batch, height and width ``Dim.AUTO``, sizes of 1 size-oblivious as the ONNX exporter takes
    them), beside timm's swin_tiny and convnext_atto; then whether the dynamic program still runs
    (and matches eager) at two other sizes. CrossFormers also export from `grouped_min_size()` up,
    where no block needs a `torch.cond`. One export each: compile caches do not carry over."""
    from torch.export import Dim
    print(f'\n## export: seconds of torch.export.export, batch {args.batch}, {args.size}x{args.size}, '
          f'{torch.get_num_threads()} threads; dynamic = batch, height, width Dim.AUTO')
    print('| model | static s | dynamic s | dynamic from grouped_min_size() s | dynamic program at 97x131, 64x960: '
          'max abs diff or failure |')
    print('|---|---:|---:|---:|---|')
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    for name in list(args.models) + [m for m in EXPORT_BASELINES if m not in args.models]:
        model = timm.create_model(name, **({'dynamic_img_size': True} if name == SWIN else {})).to(device).eval()
        start = time.perf_counter()
        torch.export.export(model, (x,))
        static = time.perf_counter() - start
        start = time.perf_counter()
        try:
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.AUTO, 2: Dim.AUTO, 3: Dim.AUTO},))
        except Exception as e:  # a baseline that cannot be exported dynamically is a result too
            print(f'| {name} | {static:.1f} | failed after {time.perf_counter() - start:.1f} | | {type(e).__name__} |')
            continue
        dynamic = time.perf_counter() - start
        bounded = ''
        if hasattr(model, 'grouped_min_size'):  # sizes where every stage is in G x G groups: no torch.cond
            low = max(model.grouped_min_size(), args.size)
            start = time.perf_counter()
            with torch.fx.experimental._config.patch(backed_size_oblivious=True):
                torch.export.export(model, (torch.randn(args.batch, 3, low, low, device=device),), dynamic_shapes=(
                    {0: Dim('batch'), 2: Dim('height', min=low), 3: Dim('width', min=low)},))
            bounded = f'{time.perf_counter() - start:.1f}'
        checks = []
        for h, w in ((97, 131), (64, 960)):
            y = torch.randn(1, 3, h, w, device=device)
            try:
                with torch.no_grad():
                    checks.append(f'{(program.module()(y) - model(y)).abs().max().item():.1e}')
            except Exception as e:
                checks.append(type(e).__name__ + ': ' + str(e).splitlines()[0][:60])
        print(f'| {name} | {static:.1f} | {dynamic:.1f} | {bounded} | {", ".join(checks)} |')


SECTIONS = {'gmacs': section_gmacs, 'eval': section_eval, 'train': section_train, 'scaling': section_scaling,
            'deploy': section_deploy, 'shapes': section_shapes, 'products': section_products,
            'speedups': section_speedups, 'tuning': section_tuning, 'export': section_export}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sections', nargs='+', default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument('--models', nargs='+', default=['crossformer_s'])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--batch', type=int, default=16)
    parser.add_argument('--size', type=int, default=224)
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--amp', default='none', choices=['none', 'bf16', 'fp16'])
    parser.add_argument('--compile', action='store_true')
    parser.add_argument('--deploy', nargs='+', default=DEPLOY_CONTENDERS, choices=DEPLOY_CONTENDERS,
                        help='contenders of the deploy section (onnxruntime and openvino need .[bench])')
    parser.add_argument('--speedup-batches', nargs='+', type=int, default=[1, 16],
                        help='batch sizes of the speedups section (default: 1 16)')
    parser.add_argument('--against', metavar='COMMIT', help='the speedups section also times this commit\'s eager model')
    parser.add_argument('--scaling-sizes', nargs='+', type=int, default=[224, 512, 768, 1024])
    parser.add_argument('--shapes', nargs='+', default=['64x960', '32x1280', '224x1792', '1280x48'],
                        help='HxW strips for the shapes section, each timed against the square of its pixel count')
    args = parser.parse_args()
    torch.manual_seed(0)
    device = torch.device(args.device)
    print(f'torch {torch.__version__}, timm {timm.__version__}, threads {torch.get_num_threads()}, device {device}')
    for name in args.sections:
        SECTIONS[name](args, device)


if __name__ == '__main__':
    main()
