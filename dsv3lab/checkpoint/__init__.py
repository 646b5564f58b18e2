"""Checkpoints in the official Hugging Face layout (docs/checkpoints.md).

A checkpoint directory holds ``config.json``, ``model.safetensors.index.json`` and shards
``model-0000i-of-0000N.safetensors`` (or one ``model.safetensors``), keyed as DeepSeek ships.
One file per concern:

  keys.py    the one key adapter: ``hf_key`` / ``module_key``, which keys are FP8 or stay fp32
  reader.py  ``ShardReader`` (the index, headers, windowed reads) over ``ShardMap`` (one mmap a
             shard), ``read_config``, ``CheckpointError``
  loading.py the one shape / check / read loop: ``load``, ``load_checkpoint`` (the ranked entry,
             ``dsv3lab.parallel.load_sharded``, adds a layout), ``reads_for``, ``read_tensors``
  saving.py  ``save``, atomic through ``dsv3lab.atomic.atomic_directory``
  v4.py      DeepSeek-V4's own key adapter, ``load_v4`` and ``save_v4``

Model construction (``dsv3lab.build``) lives beside the model, in ``dsv3lab/model/build.py``.
``dsv3lab.checkpoint.load`` and ``.save`` are the functions; their modules are ``loading`` and
``saving`` (a module named like the function it exports would be shadowed by it).
"""

from dsv3lab.checkpoint.keys import hf_key, is_fp32_key, is_fp8_key, module_key
from dsv3lab.checkpoint.reader import CheckpointError, ShardMap, ShardReader, read_config
from dsv3lab.checkpoint.loading import (FP8_MODES, TensorRead, check_finite, check_scales, load, load_checkpoint,
                                     load_summary, memory_of, read_tensors, reads_for, rss_bytes)
from dsv3lab.checkpoint.saving import save

__all__ = ["CheckpointError", "FP8_MODES", "ShardMap", "ShardReader", "TensorRead", "check_finite",
           "check_scales", "hf_key", "is_fp32_key", "is_fp8_key", "load", "load_checkpoint", "load_summary",
           "memory_of", "module_key", "read_config", "read_tensors", "reads_for", "rss_bytes", "save"]
