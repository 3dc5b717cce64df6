"""Tiny GPT-2 and BERT built from configs (no downloads), data, and train_step references for
tests/test_transformers.py and its DDP worker."""

from __future__ import annotations

import warnings

import torch

import fastsam

transformers = __import__("transformers")
from fastsam.integrations.transformers import SAMTrainer  # noqa: E402

SEQ, VOCAB, N = 8, 64, 24
OBF = dict(C=5.0, gamma=0.5)


def quiet():
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="accelerate")


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(config)


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=SEQ, num_labels=3,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


MODELS = {"gpt2": gpt2, "bert": bert}


def dataset(kind, n=N, seed=3):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=gen)
    if kind == "gpt2":
        return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]
    labels = torch.randint(0, 3, (n,), generator=gen)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def obf_ascent(kind):
    obf = fastsam.OutputBiasForgetting(**OBF)
    if kind == "gpt2":
        return lambda outputs, labels: obf(outputs.logits[:, :-1], labels[:, 1:])
    return lambda outputs, labels: obf(outputs.logits, labels)


class Recording(SAMTrainer):
    """Keeps the batches it trained on, for the reference run."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        self.seen.append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def sam_kwargs(variant):
    return {"sam": dict(rho=0.05), "gsam": dict(rho=0.05, gsam_alpha=0.4), "obf": dict(rho=0.3),
            "randsam": dict(rho=0.05, randsam=True, generator=torch.Generator().manual_seed(5))}[variant]


def make_trainer(kind, variant, out_dir, micro_batch=None, user_optimizer=False, **args):
    settings = dict(output_dir=str(out_dir), per_device_train_batch_size=4, max_steps=6, learning_rate=1e-3,
                    warmup_steps=2, lr_scheduler_type="linear", use_cpu=True, report_to=[], save_strategy="no",
                    logging_strategy="no", seed=1, max_grad_norm=1.0, disable_tqdm=True, weight_decay=0.01)
    settings.update(args)
    model = MODELS[kind]()
    optimizers = (torch.optim.AdamW(model.parameters(), lr=1e-3), None) if user_optimizer else (None, None)
    ascent = None
    if variant == "obf":
        wrapped = obf_ascent(kind)
        ascent = lambda outputs, inputs: wrapped(outputs, inputs["labels"])  # noqa: E731
    trainer = Recording(model=model, args=transformers.TrainingArguments(**settings), train_dataset=dataset(kind),
                        sam_kwargs=sam_kwargs(variant), micro_batch=micro_batch, ascent_loss=ascent,
                        optimizers=optimizers)
    trainer.seen = []
    return trainer


def reference(kind, variant, trainer, micro_batch=None, user_optimizer=False, union=None):
    """fastsam.train_step on the batches ``trainer`` saw (or ``union``), with the optimizer
    and LR scheduler the Trainer builds (AdamW, decay groups, linear warm-up)."""
    args = trainer.args
    model = MODELS[kind]()
    if user_optimizer:
        base = torch.optim.AdamW(model.parameters(), lr=1e-3)
        plain = transformers.Trainer(model=model, args=args, optimizers=(base, None))
    else:
        plain = transformers.Trainer(model=model, args=args)
    plain.create_optimizer_and_scheduler(num_training_steps=args.max_steps)
    sam = fastsam.SAM(None, plain.optimizer, **sam_kwargs(variant))
    k = args.gradient_accumulation_steps
    ascent = obf_ascent(kind) if variant == "obf" else None
    autocast = torch.bfloat16 if args.bf16 else None
    batches = union if union is not None else trainer.seen
    for i, batch in enumerate(batches):
        last = i % k == k - 1
        fastsam.train_step(model, sam, dict(batch), batch["labels"], lambda out, y: out.loss, ascent_loss=ascent,
                           micro_batch=micro_batch, accumulation_steps=k, step=last,
                           max_grad_norm=args.max_grad_norm, autocast=autocast)
        if last:
            plain.lr_scheduler.step()
    return model
