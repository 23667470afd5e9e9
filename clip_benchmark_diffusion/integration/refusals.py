"""What diffusion models refuse, and why: one line each (read by the plan's checks and by the run)."""
from __future__ import annotations

from clip_benchmark_diffusion.errors import UserError

# Tasks a diffusion model cannot serve exactly, and why (one line each).
UNSUPPORTED_TASKS = {
    "linear_probe": "a linear probe needs image features, and a diffusion classifier has none",
    "captioning": "captioning needs a text generator",
}
# clip_benchmark scores a multi-label set by each class's average precision, ranking that class's
# logits *across images*; a diffusion classifier's logits are ranks made within each image, so the
# ranking would be meaningless (a refusal, not a wrong mAP: see docs/compositional.md, issue 24).
MULTILABEL_DATASETS = ("voc2007_multilabel",)
MULTILABEL_ERROR = ("multi-label datasets ({dataset}) are not supported by diffusion models: clip_benchmark computes "
                    "each class's average precision by ranking its logits across images, and a diffusion "
                    "classifier's logits are ranks within each image; use a single-label dataset (e.g. voc2007)")
# Retrieval is served as a labelled hybrid only (adapter/retrieval.py): scoring every pair is out of reach.
RETRIEVAL_NEEDS_SHORTLIST = (
    "zeroshot_retrieval with a diffusion model needs a CLIP shortlist (every text against every image would "
    "cost images x texts x samples denoiser calls): add shortlist_model=<open_clip model>,shortlist_pretrained="
    "<its weights>,shortlist_k=10 to the scoring options (e.g. CLIP_BENCHMARK_DIFFUSION_OPTIONS), and the "
    "diffusion model reranks each query's top k")
LOAD_CLFS_ERROR = ("--load_clfs is not supported by diffusion models: a saved text classifier "
                   "holds no prompts to denoise with; drop --load_clfs")
SAVE_CLF_ERROR = ("--save_clf is not supported by diffusion models: their classifier is a one-hot "
                  "placeholder, not text features; drop --save_clf")


def unsupported_task_error(task: str) -> UserError:
    return UserError(f"task {task} is not supported by diffusion models: {UNSUPPORTED_TASKS[task]}; "
                     "use zeroshot_classification")
