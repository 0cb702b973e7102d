"""Training the memory indexer (REFERENCE.md section 3): labels from a frozen backbone, backbone-free training.

dump.dump_labels   frozen DeepSeek-V4 over documents -> label shards (labels.py holds the label math,
                   shards.py the format, shard_writer.py keeps files bounded)
trainer.train      label shards -> MemoryIndexerModel, with accelerate; the backbone is never loaded (order.py
                   visits the samples, staging.py + device_batches.py make batches on the device, on a thread
                   of their own (producer.py), dataset.py is the host reference, step.py the loss)
evaluate.evaluate  precision / recall / F1, resident fraction, recall of used chunks, recency baseline
push.push          Hub repo folder with a filled model card, uploaded with huggingface_hub
The `fm-indexer` command (cli.py) wraps the four.
"""

from .dump import DumpConfig, dump_labels
from .evaluate import evaluate
from .labels import LabelConfig
from .push import push
from .shards import LabelShards
from .trainer import TrainConfig, train

__all__ = ["DumpConfig", "LabelConfig", "LabelShards", "TrainConfig", "dump_labels", "evaluate", "push", "train"]
