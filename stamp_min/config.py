"""The settings of a federated continual experiment: one `Config`, and the table of method presets.

A method is two independent rules (METHOD §1.3, §1.4, §1.7):

    client rule   how client k turns the global model θ into its update Δ_k (client.py):
                  sgd (plain local SGD) | fedprox | ewc | lwf | replay | replay_kcenter | agem (baselines.py)
                  | tam (TAM)
    server rule   how the server turns {Δ_k} into a step (server.py): mean (FedAvg) | gm (SAM)

`--method` names a pair from PRESETS, the only list of method names in the library; `--client`
and `--server` choose (or override) either rule, so `--client replay --server gm` is replay
clients with STAMP's server, and `--method stamp` gives bit for bit what `--client tam --server
gm` gives. `name` labels a run (results file, plot titles, JSON); by default the preset the pair
belongs to, or "client+server".

The CLI is generated from this dataclass (cli.py): one flag per field, its help the docstring
under the field. `fcl_loop.run(cfg, ...)` takes a Config; notebooks write `Config(num_clients=2, ...)`.
"""

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from . import UserError, gradmatch
from .cli import check_fields
from .client import CLIENT_RULES
from .coreset import SELECTORS
from .models import MODELS
from .scenarios import SCENARIOS
from .server import SERVER_OPTS, SERVER_RULES

PRESETS = {                      # method -> (client rule, server rule)
    "fedavg": ("sgd", "mean"), "fedprox": ("fedprox", "mean"), "ewc": ("ewc", "mean"), "lwf": ("lwf", "mean"),
    "replay": ("replay", "mean"), "agem": ("agem", "mean"),
    "replay_kcenter": ("replay_kcenter", "mean"),   # replay whose buffer covers each class (k-center): issue 25's winner
    "stamp": ("tam", "gm"),          # STAMP: temporal matching on the clients, spatial matching on the server
    "stamp_tam": ("tam", "mean"),    # ablation: TAM alone
    "stamp_sam": ("sgd", "gm"),      # ablation: SAM alone
}
METHODS = tuple(PRESETS)
CHOICES = {"scenario": SCENARIOS, "model": MODELS, "method": ("",) + METHODS, "client": ("",) + CLIENT_RULES,
           "server": ("",) + SERVER_RULES, "coreset_rule": tuple(SELECTORS), "gm_solver": gradmatch.SOLVERS,
           "clone_start": ("global", "current"), "replay": ("coreset", "full"), "amp": ("off", "bf16"),
           "tam_clones": ("loop", "batched"), "device": ("auto", "cpu", "cuda"),
           "ewc_mode": ("online", "separate"), "test_split": ("fixed", "per_seed"), "server_opt": SERVER_OPTS}
NOTES = {"method": "(" + ", ".join(f"{m} = {c} + {s}" for m, (c, s) in PRESETS.items()) + ")"}   # --help
LIMITS = {                       # field -> allowed interval (cli.check_fields); every float must also be finite
    "image_size": "[8, 1024]", "num_clients": "[1, 100000]", "num_tasks": "[0, 100000]", "classes_per_task": "[1, 100000]",
    "alpha": "[0.001, 1000000]", "rounds_per_task": "[1, 100000]", "local_epochs": "[1, 100000]",
    "batch_size": "[1, 1000000]", "lr": "(0, inf)", "momentum": "[0, 1)", "participation": "(0, 1]",
    "buffer_per_class": "[1, 1000000]", "gm_c": "[0, 1000]", "eta_t": "(0, 100]", "eta_s": "(0, 100]",
    "protonet_weight": "[0, inf)", "mu": "[0, inf)", "ewc_lambda": "[0, inf)", "lwf_alpha": "[0, inf)",
    "lwf_temperature": "[0.01, 100]", "ewc_fisher_samples": "[0, 1000000000]", "agem_ref_size": "[0, 1000000]",
    "replay_share": "[0, 0.9]", "seed": "[0, 4294967295]", "server_lr": "(0, 100]", "server_momentum": "[0, 1)",
    "server_beta2": "[0, 1)", "server_tau": "[1e-12, 1]"}
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,79}")     # a name is one safe file-name component


def preset_of(client, server):
    """The method whose pair is (client, server), or None."""
    return next((m for m, pair in PRESETS.items() if pair == (client, server)), None)


@dataclass
class Config:
    """Heterogeneous federated continual learning on one machine (STAMP and baselines)."""
    dataset: str = "digits"
    """digits (offline, bundled with scikit-learn) | cifar10 | cifar100 | imagefolder"""
    data_root: str = "data"
    """folder of the dataset files (for imagefolder: the folder of class folders, or of train/ and val/)"""
    download: bool = False
    """download cifar10/cifar100 into data_root if missing (needs internet)"""
    image_size: int = 32
    """images are resized to this size (imagefolder only)"""
    scenario: str = "permutation"
    """permutation: each client its own random class order (heterogeneous) | dirichlet: shared order, label skew"""
    num_clients: int = 5
    """number of clients K"""
    num_tasks: int = 0
    """number of tasks T per client; 0 = as many as the classes allow (num_classes // classes_per_task)"""
    classes_per_task: int = 2
    """classes in each task (cpt); 2 = highly heterogeneous"""
    alpha: float = 0.5
    """Dirichlet concentration of the label split (scenario=dirichlet); smaller = more skewed"""
    share_samples: bool = False
    """give every client holding a class all its images (the authors' code) instead of a disjoint share"""
    model: str = "cnn"
    """backbone: cnn (2 conv layers) | resnet18 | swin_t"""
    method: str = "fedavg"
    """a preset pair of rules: client rule + server rule (empty: give both --client and --server)"""
    client: str = ""
    """client rule, overriding the method's: sgd | fedprox | ewc | lwf | replay | replay_kcenter (replay, its buffer picked by
    k-center) | agem | tam (empty = the method's)"""
    server: str = ""
    """server rule, overriding the method's: mean (FedAvg) | gm (spatial matching, SAM) (empty = the method's)"""
    name: str = ""
    """name of the run in the results file name, plot titles and JSON (empty = the preset, or client+server)"""
    rounds_per_task: int = 5
    """communication rounds R per task"""
    local_epochs: int = 2
    """local epochs per round on the current task"""
    batch_size: int = 16
    """local mini-batch size"""
    lr: float = 0.1
    """local SGD learning rate"""
    momentum: float = 0.0
    """local SGD momentum"""
    participation: float = 1.0
    """fraction of clients taking part in each round (at least one), drawn with the seed"""
    buffer_per_class: int = 10
    """coreset / replay buffer: images kept per class (client rules tam, replay, replay_kcenter, agem)"""
    coreset_rule: str = "prototypical"
    """how TAM's coreset picks images (client rule tam only; replay with a k-center buffer is method replay_kcenter):
    prototypical (herding) | random | nearest | prototypical_l2 (herding on L2-normalised embeddings, as iCaRL) |
    k_center (each pick the image farthest from its nearest earlier pick: the picks cover the class)"""
    mixstyle: bool = True
    """MixStyle on while replaying the coreset in TAM"""
    gm_c: float = 0.25
    """GM searching radius c (0 = plain mean)"""
    gm_solver: str = "exact"
    """GM simplex solver: exact | sgd (the authors') | adam"""
    gm_normalize: bool = False
    """rescale every update to the mean norm before GM"""
    eta_t: float = 1.0
    """client step η_t on the matched task update (the authors' code: 2)"""
    eta_s: float = 1.0
    """server step η_s on the matched client update"""
    server_opt: str = "sgd"
    """server optimiser on the server rule's step (server.py): sgd | momentum (FedAvgM) | adam (FedAdam)"""
    server_lr: float = 1.0
    """server learning rate η (sgd with 1: the server rule's step as it is)"""
    server_momentum: float = 0.9
    """β of momentum, β₁ of adam"""
    server_beta2: float = 0.99
    """β₂ of adam"""
    server_tau: float = 1e-3
    """τ of adam (adaptivity; v starts at τ²)"""
    clone_start: str = "global"
    """old-task updates in TAM start from the received model (global) or after current-task training (current, the authors' code)"""
    replay: str = "coreset"
    """TAM replays the coreset, or all old-task data (full, the authors' code)"""
    tam_clones: str = "loop"
    """how TAM trains its old-task clones: loop (one after another) | batched (all together, torch.func.vmap;
    the same updates up to float rounding; meant for GPUs, no faster on a CPU; not with swin_t; the ProtoNet loss
    keeps the loop)"""
    protonet_weight: float = 0.0
    """weight of the optional ProtoNet loss in local training (0 = off)"""
    mu: float = 0.01
    """FedProx proximal weight μ"""
    ewc_lambda: float = 10.0
    """EWC penalty weight λ, in (λ/2)·Σ F (w − w*)² with the per-image empirical Fisher (baselines.py: λ values of
    libraries that square a batch-averaged gradient do not transfer)"""
    ewc_mode: str = "online"
    """online: one penalty, Fisher summed over tasks, anchored after the latest task | separate: one penalty per old task"""
    ewc_fisher_samples: int = 0
    """images EWC's Fisher is computed on at a task's end: 0 = every image of the task; N = a class-stratified random sample of N"""
    lwf_alpha: float = 1.0
    """LwF distillation weight α"""
    lwf_temperature: float = 2.0
    """LwF distillation temperature T"""
    lwf_t2: bool = True
    """multiply LwF's distillation term by T² (Hinton et al.); false: α·KL alone (Li & Hoiem, Avalanche)"""
    agem_ref_size: int = 0
    """images of A-GEM's reference batch, drawn from the pooled buffer at every step (0 = batch_size)"""
    replay_share: float = 0.0
    """replay, replay_kcenter: 0 = the buffer joins the task's images in one shuffled pool; s in (0, 0.9] = every batch of batch_size
    current images gets round(batch_size·s/(1−s)) buffer images (0.5: as many as current ones, Avalanche's default)"""
    validation: bool = False
    """evaluate on a validation split held out of the training images instead of the test split (for tuning)"""
    test_split: str = "fixed"
    """fixed: the dataset's own test split | per_seed: train and test images pooled and split again with the seed,
    each class keeping its test count (what study.py uses: intervals over seeds then cover test-set sampling)"""
    checkpoint_dir: str = ""
    """save everything needed to continue into this folder after every round (empty = no checkpoints)"""
    resume: bool = False
    """continue the run saved in checkpoint_dir (same settings required)"""
    overwrite: bool = False
    """start afresh over a checkpoint already in checkpoint_dir, or replace a results file made by other settings or
    rules (without it, both are refused)"""
    amp: str = "off"
    """mixed precision for local training: off | bf16 (autocast; meant for GPUs)"""
    channels_last: bool = False
    """channels-last memory format for convolutional models (GPU speed-up)"""
    seed: int = 0
    """seed of the scenario, the initial model, the batches and the client sampling"""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda"""
    out: str = ""
    """results JSON path; empty = results/<dataset>_<name>_seed<seed>.json; the PNG goes beside it"""
    plot: bool = True
    """write the accuracy-matrix PNG next to the JSON"""
    quiet: bool = False
    """print only the final summary"""

    @property
    def client_rule(self):
        """The client rule in force: `client`, or the method's."""
        return self.client or PRESETS[self.method][0]

    @property
    def server_rule(self):
        """The server rule in force: `server`, or the method's."""
        return self.server or PRESETS[self.method][1]

    @property
    def label(self):
        """The run's name: `name`, else the preset of the rule pair, else "client+server"."""
        return self.name or preset_of(self.client_rule, self.server_rule) or f"{self.client_rule}+{self.server_rule}"

    def resolved(self):
        """These settings with the rule pair in force spelled out: client and server filled in,
        method = the preset of that pair, or "" when the pair is no preset (what results record)."""
        c, s = self.client_rule, self.server_rule
        return replace(self, method=preset_of(c, s) or "", client=c, server=s)

    @property
    def out_path(self):
        return Path(self.out or f"results/{self.dataset}_{self.label}_seed{self.seed}.json")

    def validate(self):
        """One UserError line for the first mistake: a field's type, range or finiteness (LIMITS),
        an unknown choice (CHOICES), or settings that contradict each other. Touches no file."""
        check_fields(self, LIMITS)
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"{name}={getattr(self, name)!r} is unknown; allowed: {', '.join(a for a in allowed if a)}")
        if not self.method and not (self.client and self.server):
            raise UserError(f"method='' needs both rules, got client={self.client!r} server={self.server!r}; "
                            f"allowed: a method, or --client and --server")
        if self.name and not NAME.fullmatch(self.name):
            raise UserError(f"name={self.name!r} is not a plain name; allowed: up to 80 letters, digits and _.+=- "
                            f"(starting with a letter or digit)")
        if self.resume and self.overwrite:
            raise UserError("resume=True and overwrite=True contradict each other; allowed: one of them")
        if self.checkpoint_dir and self.out and Path(self.out).resolve() == (Path(self.checkpoint_dir) / "checkpoint.pt").resolve():
            raise UserError(f"out={self.out!r} is the checkpoint file; allowed: a results path outside the checkpoint")
        if self.resume and not self.checkpoint_dir:
            raise UserError("resume=True needs checkpoint_dir; allowed: --checkpoint-dir DIR --resume true")
        if self.tam_clones == "batched" and self.model == "swin_t":
            raise UserError("tam_clones='batched' cannot reproduce swin_t's stochastic depth (random draws inside the "
                            "model); allowed: tam_clones='loop' with swin_t")
        if self.coreset_rule != Config.coreset_rule and self.client_rule != "tam":          # set, but nothing reads it
            raise UserError(f"coreset_rule={self.coreset_rule!r} is TAM's coreset rule; client rule {self.client_rule} does not use "
                            f"it; allowed: coreset_rule with client rule tam (stamp, stamp_tam); replay with a k-center "
                            f"buffer is method replay_kcenter")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise UserError("device='cuda' but CUDA is not available here; allowed: auto, cpu")
