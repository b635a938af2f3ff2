"""The narrowest safe readers of weight files, for checkpoints from untrusted sources.

:func:`read_torch_file` reads a ``torch.save`` zip archive with a small pickle machine of its own
(never :mod:`pickle` and never ``torch.load``): every opcode and every global it accepts is listed
on purpose, and nothing it reads can call, import or mutate anything. What it returns is built
only from ``dict``, ``collections.OrderedDict``, ``list``, ``tuple``, ``str``, ``bytes``, ``int``,
``float``, ``bool``, ``None``, ``torch.dtype``, dense CPU tensors and :class:`InertConfig`.
:func:`read_safetensors_file` checks a safetensors header in full before reading the tensors.

Both readers bound what they allocate by the file's size (and by ``max_bytes`` when given) before
allocating it, read each tensor's bytes once, and turn every defect of the file into a
:class:`~crossformer.errors.CheckpointError` that names the file. They do not judge the contents:
key names, dtypes, shapes and finiteness are for the caller to check against its model.

One module per concern, each read on its own:

- ``untrusted``: opening a file, exact reads, and the one place where its defects become errors
- ``zip_archive``: the records of a ``torch.save`` zip, every header checked
- ``values``: the inert values a pickle is read as (global tokens, storage and tensor specs, configs)
- ``pickle_machine``: the opcodes run, one handler each, in groups; the accepted globals
- ``tensors``: bytes to tensors, and tensor specs to views once the whole pickle is checked
- ``torch_file``, ``safetensors_file``: the two readers, putting the pieces together
"""

from .safetensors_file import read_safetensors_file, read_safetensors_metadata
from .torch_file import read_torch_file
from .values import InertConfig

__all__ = ['InertConfig', 'read_torch_file', 'read_safetensors_file', 'read_safetensors_metadata']
