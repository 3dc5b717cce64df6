"""Hugging Face Trainer with fastsam: SAMTrainer on a tiny GPT-2 built from a config.

    python examples/hf_trainer.py --steps 10
    torchrun --nproc_per_node=2 examples/hf_trainer.py --steps 10     # DDP (gloo on the CPU)
"""

import argparse
import tempfile

import torch
from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import fastsam
from fastsam.integrations.transformers import SAMTrainer

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=10)
args = parser.parse_args()

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=256, n_positions=16))
ids = torch.randint(0, 256, (256, 16))
data = [{"input_ids": row, "labels": row} for row in ids]
obf = fastsam.OutputBiasForgetting(C=1000, gamma=1.0)

trainer = SAMTrainer(
    model=model, train_dataset=data,
    args=TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=8,
                           gradient_accumulation_steps=2, learning_rate=1e-3, warmup_steps=2, max_grad_norm=1.0,
                           use_cpu=True, report_to=[], logging_steps=5, save_strategy="no"),
    sam_kwargs=dict(rho=0.6), micro_batch=4,  # OBF: SAM around AdamW, ascent along the OBF loss
    ascent_loss=lambda outputs, inputs: obf(outputs.logits[:, :-1], inputs["labels"][:, 1:]))
trainer.train()
