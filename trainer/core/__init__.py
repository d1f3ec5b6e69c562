"""The training core every phase runs on: the component contract, the DeepSpeed engine, the train and
eval epochs, the learning-rate curve, momentum carry-over, distillation and fault injection.

Import the modules themselves: ``trainer.core.component``, ``distill``, ``engine``, ``faults``, ``loop``,
``lr_curve``, ``momentum``."""
