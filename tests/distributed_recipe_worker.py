"""Run by tests/test_seams.py under torchrun: the in-loop BASH recipe of docs/ops.md, then every
parameter gathered from every rank into a JSON file.

    distributed_recipe_worker.py OUT RECIPE       RECIPE: "inside" (docs/ops.md's: trunk and loss
                                                  inside the DDP-wrapped module's forward) or
                                                  "outside" (the trunk called beside DDP, its
                                                  gradients never synchronised)
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import gapfix
from gapfix.data import collate, encode_example, math_task, sft_row
from gapfix.methods.bash import mixed_inputs_embeds, predict_alternatives
from gapfix.models import tiny_llama
from gapfix.trainer import CausalLMLoss, leave_process_group


def main(out_path, recipe):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = math_task.math_tokenizer()
    examples = [encode_example(tokenizer, p["prompt"], p["response"], p)
                for p in math_task.make_split("train", 32, seed=7)]
    model = tiny_llama(tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0).train()
    loss_module = DistributedDataParallel(CausalLMLoss(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rows = [sft_row(e) for e in examples]
    for step in range(3):
        global_rows = rows[step * 8:(step + 1) * 8]
        tokens_in_step = sum(label != -100 for r in global_rows for label in r["labels"][1:])
        batch = collate(global_rows[rank::world], pad_id=tokenizer.pad_token_id)
        answer = batch["labels"] != -100
        # BASH: the frozen model's own tokens (a no-grad pass: it may run outside DDP) ...
        alts = predict_alternatives(model, batch["input_ids"], batch["attention_mask"], answer,
                                    mode="sample", temperature=2.0, seed=step)
        batch.update(alt_ids=alts.alt_ids, eligible=answer)
        optimizer.zero_grad()
        if recipe == "inside":  # ... mixed, run and scored inside the DDP-wrapped module's forward
            loss_sum, _ = loss_module(batch, mix_seed=step * world + rank, beta=0.3)
        else:
            embeds, _ = mixed_inputs_embeds(model, batch["input_ids"], alts.alt_ids, beta=0.3,
                                            seed=step * world + rank, eligible=answer)
            hidden = model.base_model(inputs_embeds=embeds,
                                      attention_mask=batch["attention_mask"]).last_hidden_state
            shifted = torch.cat([batch["labels"][:, 1:], torch.full_like(batch["labels"][:, :1], -100)], 1)
            loss_sum = gapfix.linear_cross_entropy(hidden.flatten(0, 1), model.lm_head.weight,
                                                   shifted.flatten(), reduction="sum")
        # DDP averages gradients over ranks: scale so that the update is that of the global batch
        (loss_sum * world / tokens_in_step).backward()
        optimizer.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        initial = torch.cat([p.detach().flatten() for p in tiny_llama(
            tokenizer, hidden_size=32, num_layers=1, num_heads=2, seed=0).parameters()])
        with open(out_path, "w") as f:
            json.dump({"max_rank_difference": max(float((g - gathered[0]).abs().max()) for g in gathered),
                       "moved": float((gathered[0] - initial).abs().max())}, f)
    del loss_module, optimizer  # the DDP wrapper holds the process group: it goes before the group
    leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
