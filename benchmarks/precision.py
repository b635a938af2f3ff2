"""Accuracy and speed of the inference precisions a CPU user can pick, on a trained model's validation split.

    crossformer train                                            # the digits model, in outputs/digits/
    python benchmarks/precision.py --checkpoint outputs/digits   # a model folder or weights file

For fp32, ``model.to(torch.bfloat16)``, bf16 autocast and dynamic int8 Linears (torch.ao's
``quantize_dynamic``, and torchao's where installed): top-1 on the validation images, how many
predictions differ from fp32, the largest logit difference from fp32, and the speed relative to
fp32 in interleaved rounds over the same batches.
"""
import argparse
import copy
import statistics
import time
import warnings
from typing import Callable, Dict

import torch

from crossformer.predict import load_trained
from crossformer.train.config import TrainConfig
from crossformer.train.data import build_datasets, build_transform, val_loader


def precisions(model: torch.nn.Module) -> Dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """One callable per precision, each mapping a batch of images to fp32 logits."""
    runs = {'fp32': model}
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    runs['bf16'] = lambda x: bf16(x.to(torch.bfloat16)).float()

    def autocast(x):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            return model(x).float()
    runs['autocast-bf16'] = autocast
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # torch.ao's path is deprecated, still shipped
        runs['int8-torch.ao'] = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear},
                                                                       dtype=torch.qint8)
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        print('torchao is not installed: its int8 row is left out')
    else:
        int8 = copy.deepcopy(model)
        quantize_(int8, Int8DynamicActivationInt8WeightConfig())
        runs['int8-torchao'] = int8
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--checkpoint', required=True, help='a model folder or weights file written by crossformer train')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--rounds', type=int, default=3, help='interleaved timing rounds over the whole split')
    args = parser.parse_args()
    loaded = load_trained(args.checkpoint)
    data = loaded.info
    cfg = TrainConfig(dataset=data.get('dataset', 'digits'), img_size=loaded.img_size, interpolation=loaded.interpolation,
                      crop_pct=loaded.crop_pct, mean=tuple(loaded.mean), std=tuple(loaded.std), mixup=0.0, cutmix=0.0,
                      batch_size=args.batch_size, workers=0)
    transform = build_transform(cfg, dict(mean=cfg.mean, std=cfg.std), training=False)
    batches = [(x, y) for x, y in val_loader(build_datasets(cfg, None, transform, train=False).val, cfg)]
    runs = precisions(loaded.model)
    times: Dict[str, list] = {k: [] for k in runs}
    with torch.inference_mode():
        logits = {k: torch.cat([fn(x) for x, _ in batches]) for k, fn in runs.items()}
        for _ in range(args.rounds):
            for k, fn in runs.items():
                start = time.perf_counter()
                for x, _ in batches:
                    fn(x)
                times[k].append(time.perf_counter() - start)
    labels = torch.cat([y for _, y in batches])
    reference = logits['fp32']
    print(f'{args.checkpoint}: {len(labels)} validation images, batch {args.batch_size}, {loaded.img_size}px, '
          f'{torch.get_num_threads()} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}')
    print('| precision | top-1 | predictions unlike fp32 | max abs logit diff | speed vs fp32 |')
    print('|---|---:|---:|---:|---:|')
    base = statistics.median(times['fp32'])
    for k, out in logits.items():
        top1 = (out.argmax(1) == labels).float().mean().item() * 100
        changed = (out.argmax(1) != reference.argmax(1)).sum().item()
        print(f'| {k} | {top1:.2f}% | {changed} | {(out - reference).abs().max().item():.1e} '
              f'| {base / statistics.median(times[k]):.2f}x |')
    print(f'(largest fp32 logit: {reference.abs().max().item():.2f})')


if __name__ == '__main__':
    main()
