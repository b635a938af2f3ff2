"""The ``crossformer`` command: train, validate, info, convert, predict, viz, tune.

Each subcommand parses its arguments and calls one function of the library. The library's own
errors (:class:`~crossformer.errors.CrossFormerError`: missing files, unknown models or config
keys, empty datasets, unusable checkpoints) end with a one-line error and exit status 2; anything
else is a bug and keeps its traceback.

``crossformer train`` stopped by SIGTERM or SIGINT (Ctrl-C) finishes its step, saves a snapshot and
exits with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT), as a shell reports a
process ended by that signal: a job script requeues the run and continues it with ``--resume``.
"""
import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import List, Optional, Sequence

import timm

from . import __version__
from .convert import convert_checkpoint, convert_to_model_folder
from .errors import ConfigError, CrossFormerError, MissingFileError
from .info import format_table, measure, variant_names
from .models import check_variant
from .predict import load_trained, predict
from .tune import format_choices, tune
from .train import load_config, parse_overrides, resume_config, train, validate
from .train.engine import default_device
from .viz import explain, plot_groups

__all__ = ['main', 'build_parser']

EPILOG_TRAIN = """\
overrides: KEY=VALUE pairs for any config key, e.g. epochs=10 lr=1e-3 batch_size=32
  model_kwargs.embed_dim=48 (see configs/ and crossformer.config.TrainConfig).

examples:
  crossformer train                                   # embedded digits, about a minute on 2 CPU cores
  crossformer train --data-dir mydata --pretrained crossformer-s.pth   # fine-tune CrossFormer-S on a folder
  crossformer train --data-dir mydata --pretrained crossformer-t.pth model=crossformer_t
  crossformer train --config configs/crossformer_s.yaml --data-dir /data/imagenet
  crossformer train --resume outputs/digits epochs=30 # continue, here with a longer schedule
  torchrun --nproc_per_node 8 -m crossformer train --config configs/crossformer_s.yaml --data-dir DIR
"""


def _device(name: Optional[str]) -> str:
    return name or default_device()


def _size(values: Optional[Sequence[int]], default: int = 224) -> tuple:
    values = list(values or [default])
    if len(values) not in (1, 2) or min(values) < 4:
        raise ConfigError(f'--img-size takes one or two sizes >= 4 (H [W]), got {values}')
    return (values[0], values[-1])


def cmd_train(args) -> int:
    overrides = parse_overrides(args.overrides)
    for key, option in (('data_dir', 'data_dir'), ('output', 'output'), ('initial_checkpoint', 'pretrained')):
        if getattr(args, option):
            overrides[key] = getattr(args, option)
    if args.data_dir:
        overrides['dataset'] = 'folder'
    if args.pretrained and not Path(args.pretrained).exists():  # before the data is read
        raise MissingFileError(f'--pretrained {args.pretrained}: no such file or model folder')
    if args.resume:
        if args.config:
            raise ConfigError('--resume continues with the config saved in the run; give overrides, not --config')
        if args.pretrained:
            raise ConfigError('--pretrained gives the weights a new run starts from; --resume continues a run '
                              'with its own: pass one of them')
        cfg = resume_config(args.resume, overrides)
    else:
        cfg = load_config(args.config, overrides)
    trainer = train(cfg, resume=args.resume, progress=not args.no_progress)
    if trainer.stopped_by:
        if trainer.rt.is_main:
            print(f'crossformer train: stopped by {signal.Signals(trainer.stopped_by).name} at epoch {trainer.epoch}, '
                  f'step {trainer.step}; snapshot saved, continue with: crossformer train --resume {trainer.output}',
                  file=sys.stderr)
        return 128 + trainer.stopped_by
    if trainer.rt.is_main:
        last = trainer.history[-1] if trainer.history else {}
        if 'val_top1' in last:
            print(f'done: epoch {trainer.epoch}, val top-1 {last["val_top1"]:.2f}%, top-5 {last["val_top5"]:.2f}%, '
                  f'loss {last["val_loss"]:.4f}; best top-1 {trainer.best["top1"]:.2f}% (epoch {trainer.best["epoch"]})')
        print(f'model folder (best epoch): {trainer.output}/ (model.safetensors, config.json, README.md); '
              f'resume from: {trainer.output}/snapshots/; metrics: {trainer.output}/metrics.csv, plot: {trainer.output}/metrics.png')
    return 0


def cmd_validate(args) -> int:
    device = _device(args.device)
    loaded = load_trained(args.checkpoint, model=args.model, img_size=args.img_size, device=device)
    names = loaded.class_names if loaded.info.get('class_names') else None
    result = validate(loaded.model, args.data_dir, data=loaded.data, class_names=names, batch_size=args.batch_size,
                      workers=args.workers, device=device, progress=not args.no_progress)
    print(f'{args.checkpoint}: top-1 {result["top1"]:.2f}%  top-5 {result["top5"]:.2f}%  '
          f'loss {result["loss"]:.4f}  ({result["count"]} images)')
    return 0


def cmd_info(args) -> int:
    names = [check_variant(args.model)] if args.model else variant_names()
    size = _size(args.img_size)
    rows = sorted((measure(name, size) for name in names), key=lambda r: ('pp' in r['name'], r['params']))
    print(format_table(rows))
    print(f'\nGMACs: torch.utils.flop_counter at {size[0]}x{size[1]}, batch 1. '
          f'Paper figures: ImageNet-1k at 224x224.')
    return 0


def _hw(text: str) -> tuple:
    h, sep, w = text.partition('x')
    if not (h.isdigit() and (w.isdigit() or not sep)):
        raise ConfigError(f'--sizes takes N or HxW, got {text!r}')
    return int(h), int(w or h)


def cmd_tune(args) -> int:
    rows = tune(args.model, [_hw(s) for s in args.sizes], args.batch, args.dtype)
    print(format_choices(rows))
    return 0


def cmd_convert(args) -> int:
    dst = Path(args.dst)
    if dst.suffix not in ('.safetensors', '') and not dst.is_dir():
        raise ConfigError(f'the destination must end in .safetensors, or be a folder (no suffix), got {dst}')
    if dst.suffix != '.safetensors':
        if not args.model:
            raise ConfigError(f'{args.dst} is a model folder: pass --model NAME (or name a .safetensors file)')
        convert_to_model_folder(args.src, args.dst, args.model)
        print(f'wrote model folder {args.dst}/ (config.json, model.safetensors, README.md) for {args.model}; '
              f"load it with timm.create_model('local-dir:{args.dst}', pretrained=True)")
        return 0
    state_dict = convert_checkpoint(args.src, args.dst, model_name=args.model or '')
    checked = f', checked against {args.model}' if args.model else ''
    print(f'wrote {args.dst}: {len(state_dict)} tensors{checked}')
    return 0


def cmd_predict(args) -> int:
    device = _device(args.device)
    loaded = load_trained(args.checkpoint, model=args.model, img_size=args.img_size, device=device)
    for image, top in zip(args.images, predict(loaded, args.images, topk=args.topk, device=device)):
        print(image)
        for rank, (name, prob) in enumerate(top, 1):
            print(f'  {rank}. {100 * prob:6.2f}%  {name}')
    return 0


def cmd_viz(args) -> int:
    if args.map_size:
        H, W = _size(args.map_size)
        path = plot_groups(H, W, args.group_size, args.interval, Path(args.output) / f'groups_{H}x{W}.png')
        print(f'wrote {path}')
        return 0
    if args.checkpoint:
        loaded = load_trained(args.checkpoint, model=args.model)
        model, name = loaded.model, loaded.info['model']
        size = _size(args.img_size, loaded.img_size)
    else:
        name = check_variant(args.model or 'crossformer_s')
        model, size = timm.create_model(name).eval(), _size(args.img_size)
        print('note: no --checkpoint, the DPB maps show freshly initialized weights', file=sys.stderr)
    for path in explain(model, size, args.output, name=name):
        print(f'wrote {path}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='crossformer', description='CrossFormer and CrossFormer++ for timm.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    parser.add_argument('-v', '--verbose', action='store_true', help='log debug messages and show tracebacks')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    fmt = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser('train', help='train a model (default: a small one on the embedded digits)',
                       description='Train a classifier. Without --config: with --data-dir, the fine-tuning recipe '
                                   '(CrossFormer-S at 224 px, configs/finetune.yaml); without it, a small CrossFormer '
                                   'on the 8x8 digits that ship with scikit-learn, upscaled to 32x32.',
                       epilog=EPILOG_TRAIN, formatter_class=fmt)
    p.add_argument('--config', metavar='FILE', help='YAML recipe (configs/*.yaml); default: the fine-tuning recipe '
                                                    'with --data-dir, else the embedded digits recipe')
    p.add_argument('--data-dir', metavar='DIR', help='ImageFolder tree with train/ and val/ (default: embedded digits)')
    p.add_argument('--pretrained', metavar='FILE', help="weights to start from: the paper's .pth, a .safetensors file "
                                                        'or a model folder; a head for other classes is replaced '
                                                        '(the initial_checkpoint key)')
    p.add_argument('--output', metavar='DIR', help='where checkpoints, metrics.csv and metrics.png go')
    p.add_argument('--resume', metavar='RUN', help='continue a run from its newest complete snapshot: its output directory '
                                                 '(or one snapshots/step-N folder)')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    p.add_argument('overrides', nargs='*', metavar='KEY=VALUE', help='config overrides; they win over the file')
    p.set_defaults(func=cmd_train)

    p = sub.add_parser('validate', help='top-1/top-5 accuracy and loss of a checkpoint',
                       description='Evaluate a checkpoint on the val/ split of an ImageFolder tree (or on the embedded '
                                   'digits, for a model trained on them).')
    p.add_argument('--checkpoint', required=True, metavar='FILE', help='.safetensors or .pth file')
    p.add_argument('--data-dir', metavar='DIR', help='ImageFolder tree with a val/ folder')
    p.add_argument('--model', metavar='NAME', help='model name; needed unless the file was written by crossformer train')
    p.add_argument('--img-size', type=int, metavar='N', help='input size (default: the checkpoint\'s, else 224)')
    p.add_argument('--batch-size', type=int, default=128, metavar='N', help='default: %(default)s')
    p.add_argument('--workers', type=int, default=4, metavar='N', help='data loading processes (default: %(default)s)')
    p.add_argument('--device', help='default: cuda if available, else cpu')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser('info', help='params, GMACs and feature maps of the variants, next to the paper\'s figures')
    p.add_argument('model', nargs='?', metavar='MODEL', help='one variant (default: all)')
    p.add_argument('--img-size', type=int, nargs='+', metavar='N', help='H [W] for GMACs and map sizes (default: 224)')
    p.set_defaults(func=cmd_info)

    p = sub.add_parser('convert', help='a reference checkpoint (.pth) to .safetensors or to a Hub model folder')
    p.add_argument('src', metavar='SRC', help='checkpoint from github.com/cheerss/CrossFormer (or any state dict)')
    p.add_argument('dst', metavar='DST', help='output .safetensors file, or a folder: a Hub model folder (needs --model)')
    p.add_argument('--model', metavar='NAME', help='check that the result loads strictly into this variant')
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser('predict', help='top-k classes for images')
    p.add_argument('images', nargs='+', metavar='IMAGE')
    p.add_argument('--checkpoint', required=True, metavar='FILE', help='.safetensors or .pth file')
    p.add_argument('--model', metavar='NAME', help='model name; needed unless the file was written by crossformer train')
    p.add_argument('--topk', type=int, default=5, metavar='K', help='default: %(default)s')
    p.add_argument('--img-size', type=int, metavar='N', help='input size (default: the checkpoint\'s, else 224)')
    p.add_argument('--device', help='default: cuda if available, else cpu')
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser('viz', help='PNGs of the SDA/LDA groups and the DPB bias maps', formatter_class=fmt,
                       description='Draw, for every stage of a model at an input size, which tokens share an SDA and '
                                   'an LDA group, and the DPB bias of its first two blocks per head.',
                       epilog='examples:\n  crossformer viz --model crossformer_s --checkpoint s.safetensors\n'
                              '  crossformer viz --map-size 56 --group-size 7 --interval 8')
    p.add_argument('--model', metavar='NAME', help='variant (default: the checkpoint\'s, else crossformer_s)')
    p.add_argument('--checkpoint', metavar='FILE', help='weights for the DPB maps (default: fresh initialization)')
    p.add_argument('--img-size', type=int, nargs='+', metavar='N', help='input H [W] (default: 224)')
    p.add_argument('--map-size', type=int, nargs='+', metavar='N', help='only draw groups on a token map H [W]')
    p.add_argument('--group-size', type=int, default=7, metavar='G', help='with --map-size (default: %(default)s)')
    p.add_argument('--interval', type=int, default=2, metavar='I', help='with --map-size (default: %(default)s)')
    p.add_argument('--output', default='viz', metavar='DIR', help='default: %(default)s')
    p.set_defaults(func=cmd_viz)

    p = sub.add_parser('tune', help='time every product path of a model on this host now, for a deployment',
                       formatter_class=fmt,
                       description='Run a model at the sizes and batches a deployment serves, so each Linear and '
                                   'convolution takes the path timed fastest on this host from the first request on; '
                                   'the choices are kept per host in $XDG_CACHE_HOME/crossformer '
                                   '(CROSSFORMER_TUNING_CACHE moves it).',
                       epilog='examples:\n  crossformer tune crossformer_s\n'
                              '  crossformer tune crossformer_s --sizes 224 384x640 --batch 1 16 --dtype float32 bfloat16')
    p.add_argument('model', metavar='MODEL')
    p.add_argument('--sizes', nargs='+', default=['224'], metavar='N|HxW', help='input sizes (default: 224)')
    p.add_argument('--batch', nargs='+', type=int, default=[1], metavar='N', help='batch sizes (default: 1)')
    p.add_argument('--dtype', nargs='+', default=['float32'], metavar='DTYPE', help='float32, bfloat16 (default: float32)')
    p.set_defaults(func=cmd_tune)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format='%(message)s')
    try:
        return args.func(args)
    except CrossFormerError as e:
        if args.verbose:
            raise
        print(f'crossformer {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'crossformer {args.command}: interrupted', file=sys.stderr)
        return 130
