"""Typed run configuration. Each dataclass is registered with hydra; YAML in configs/ only sets values,
so an unknown key anywhere (YAML or command line) is an error."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DataKind(enum.Enum):
    synthetic = "synthetic"
    areal_prompts = "areal_prompts"  # prompts JSONL + id2info.json
    areal_jsonl = "areal_jsonl"  # one JSONL with query_id, prompt, task, solutions
    jsonl = "jsonl"  # generic prompt/problem + answer/solution JSONL
    code_jsonl = "code_jsonl"  # HumanEval, MBPP or AReaL input_output code problems (with reward.kind=code)
    synthetic_code = "synthetic_code"  # complete def f(x) to match a table (data/synthetic_code.py; reward.kind=code)
    synthetic_products = "synthetic_products"  # a 3- by 4-digit product, for a calculator (data/synthetic_products.py)


class Objective(enum.Enum):
    decoupled = "decoupled"  # proximal logprobs recomputed by the learner before the update
    naive = "naive"  # proximal := behaviour (standard PPO on off-policy data), for ablations


class KLMode(enum.Enum):
    """How ppo.kl_coef keeps the policy near its reference (the initial policy: resumed stages keep it)."""

    loss = "loss"  # a k3 estimate of KL(pi_theta || pi_ref) added to the loss
    # AReaL v0.1's kl_ctl: -kl_coef (log pi_prox - log pi_ref) on every output token, summed to the end of its
    # sequence and added to the token's advantage (after ppo.advantage_norm: AReaL normalises the sum; ours)
    reward = "reward"


class AdvantageNorm(enum.Enum):
    """How rewards become advantages (gamma = lambda = 1, no critic: every token of a sample gets its sample's)."""

    group = "group"  # reward - its group's mean
    group_std = "group_std"  # (reward - group mean) / group std
    batch = "batch"  # (reward - mean) / std over every output token of the step (AReaL v0.1: adv_norm, no group norm)
    none = "none"  # the reward itself


class BehaviourWeightMode(enum.Enum):
    clip = "clip"  # w = min(w, cap)
    mask = "mask"  # tokens with w > cap leave the loss (AReaL's choice)


class EngineKind(enum.Enum):
    torch = "torch"  # the built-in engine (continuous batching; CUDA graphs on GPU)
    vllm = "vllm"  # actors/vllm_engine.py; needs vLLM installed (the `vllm` extra)


class RewardKind(enum.Enum):
    """What the prompts' gold answers are: math answers, or a code problem's tests (run in the code sandbox)."""

    math = "math"
    code = "code"


class SFTTask(enum.Enum):
    """What the warm start is trained to answer."""

    arithmetic = "arithmetic"  # the synthetic arithmetic task
    code_table = "code_table"  # the synthetic coding task: complete def f(x) to match a table
    tool_products = "tool_products"  # chats that call the calculator on a product, or guess it (agents' task)


class ExtractMode(enum.Enum):
    """How the final answer is taken from a response (areal_async/reward/extraction.py): "auto" tries the others
    in this order."""

    auto = "auto"
    boxed = "boxed"
    answer_is = "answer_is"
    final_answer = "final_answer"
    latex = "latex"
    last_number = "last_number"
    # Not in "auto": the last <answer>...</answer> (Open-Reasoner-Zero's prompt, data.prompt_type=orz), a \boxed{}
    # in it if there is one, else all of it; a response without the tag as "auto".
    answer_tag = "answer_tag"


class PromptType(enum.Enum):
    """The prompt templates of areal_async/prompts.py."""

    r1_distilled = "r1_distilled"  # DeepSeek-R1-Distill chat format, ending in <think>
    orz = "orz"  # Open-Reasoner-Zero: reasoning in <think></think>, the answer in <answer></answer>
    boxed = "boxed"  # the synthetic task's "Q: ...\nA: "
    none = "none"  # the problem text as it is


class DecodeAttention(enum.Enum):
    """The engine's decode attention over its paged KV cache."""

    auto = "auto"  # triton on CUDA, gather elsewhere
    triton = "triton"  # the paged split-KV Triton kernel: reads only each sequence's own blocks (CUDA)
    gather = "gather"  # the reference: every row's blocks gathered, then one softmax (any device; no CUDA graphs)


class PackedAttentionKernel(enum.Enum):
    """The learner's attention over packed sequences on CUDA, for bf16/fp16 inputs (other dtypes use flex)."""

    auto = "auto"  # cudnn for a pack of few, long document lengths (see PackedAttentionConfig), else flash
    flash = "flash"  # every pack through the varlen flash kernel (FlashAttention-2)
    cudnn = "cudnn"  # each distinct document length as one dense causal batch through cuDNN (head_dim <= 128)
    flex = "flex"  # flex_attention with a document BlockMask


class OneRankMode(enum.Enum):
    """How a one-rank learner group trains."""

    plain = "plain"  # the module itself: fp32 parameters and gradients, bf16 compute under autocast on CUDA
    fsdp = "fsdp"  # FSDP2 on a one-rank mesh, as on several ranks (bf16 gathered copies of fp32 shards)


class WandbMode(enum.Enum):
    disabled = "disabled"
    offline = "offline"
    online = "online"


class ModelShape(enum.Enum):
    """Built-in model shapes (areal_async/model/shapes.py): the config.json values of public checkpoints, for
    `areal-async plan` before the weights are on disk."""

    r1_distill_qwen_1_5b = "r1_distill_qwen_1_5b"  # deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B
    qwen2_5_7b = "qwen2_5_7b"  # Qwen/Qwen2.5-7B


def _at_least(section: str, **values: tuple[float, float]) -> None:
    """Raises ValueError naming the first `section.key` whose value is below its minimum: key=(value, minimum)."""
    for name, (value, minimum) in values.items():
        if value < minimum:
            raise ValueError(f"{section}.{name} must be >= {minimum}, got {value}")


@dataclass
class ModelConfig:
    # A Hugging Face checkpoint folder; null = the project's own warm start for the synthetic task.
    path: str | None = None
    dtype: str = "float32"  # the weights' dtype for engine and learner compute (bfloat16 on GPUs)
    # The shape `areal-async plan` uses when `path` holds no config.json (training always reads `path`).
    shape: ModelShape | None = None


@dataclass
class ArithmeticConfig:
    """The synthetic task's difficulty: `min_operands`..`max_operands` integers in [0, max_operand] joined by
    `operators` (a subset of '+-*')."""

    min_operands: int = 2  # operands per problem, at least
    max_operands: int = 2  # operands per problem, at most
    max_operand: int = 99  # the largest operand
    operators: str = "+-"  # operators to draw from

    def __post_init__(self) -> None:
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(f"need 2 <= min_operands <= max_operands, got {self.min_operands}, {self.max_operands}")
        if self.max_operand < 1:
            raise ValueError(f"max_operand must be >= 1, got {self.max_operand}")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators must be a non-empty subset of '+-*', got {self.operators!r}")


@dataclass
class DataConfig:
    kind: DataKind = DataKind.synthetic  # where the prompts come from (data.path for the file kinds)
    path: str | None = None  # prompts file (areal_prompts, areal_jsonl, jsonl)
    id2info_path: str | None = None  # areal_prompts only
    heldout_path: str | None = None  # optional held-out file of the same kind (else a split of `path`)
    # Put around every training and held-out prompt of a file (not synthetic), unless the prompt already has it:
    # a prompt type's template (as eval.prompt_type), or a template of your own, e.g.
    # "{problem}\nPlease put your final answer within \\boxed{}." (not both).
    prompt_type: PromptType | None = None
    prompt_template: str | None = None  # a template with {problem} for every prompt (or data.prompt_type)
    num_heldout: int = 200  # prompts kept out of training for the held-out evaluation
    num_train: int = 20000  # synthetic only
    seed: int = 0  # the seed of the held-out split and the data order
    # [lo, hi]: a prompt whose last group solved a fraction of its answers outside it is skipped when the data
    # order comes to it again (AReaL v0.3's success-rate filter is 0.05-0.95). null: every prompt, every epoch.
    success_rate_range: list[float] | None = None
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)

    def __post_init__(self) -> None:  # composing the config fails here, before a run starts
        if self.prompt_type is not None and self.prompt_template is not None:
            raise ValueError("set data.prompt_type or data.prompt_template, not both")
        bounds = self.success_rate_range
        if bounds is not None and (len(bounds) != 2 or not 0.0 <= bounds[0] <= bounds[1] <= 1.0):
            raise ValueError(f"data.success_rate_range must be [lo, hi] with 0 <= lo <= hi <= 1, got {list(bounds)}")


@dataclass
class EngineConfig:
    """The built-in engine (actors/engine.py): the driver's (inline rollout, evaluation) and, with
    rollout.engine=torch, every rollout worker's."""

    max_slots: int = 256  # sequences decoded at once, at most (the decode batch)
    # The KV pool's memory budget. null: unbounded on a CPU (every slot can hold the longest request); on one GPU
    # (inline placement) what the learner and the engine's weights leave of the GPU's memory, planned and checked
    # when the run starts.
    kv_memory_gib: float | None = None
    kv_block_size: int = 64  # positions per KV block (a power of two >= 16 for the Triton decode kernel)
    # Planning only (`areal-async plan`, the one-GPU check, the simulator): a sequence in flight is expected to hold
    # its prompt and this share of generation.max_new_tokens. The pool is sized by that; a pool that runs dry
    # preempts the youngest sequences, which resume later.
    expected_length_fraction: float = 0.25
    sync_every: int = 8  # decode steps between the host's looks at which sequences finished
    prefill_tokens: int = 16384  # padded tokens per prefill forward
    share_prompts: bool = True  # the samples of one prompt share its full KV blocks, prefilled once
    cuda_graphs: bool | None = None  # null: on CUDA
    # torch.compile of the decode forward, and of the prefill and recompute forwards: off, since the elementwise
    # kernels do the same fusions without compiling (the same tokens/s, a cold start of 7 s: benchmarks/NOTES.md)
    compile_decode: bool = False
    compile_prefill: bool = False  # see compile_decode
    decode_attention: DecodeAttention = DecodeAttention.auto  # triton where it suits, else gather
    decode_split_tokens: int = 1024  # positions one decode-kernel program reads (benchmarks/NOTES.md: the sweep)
    fused_sampling: bool | None = None  # one Triton kernel draws the token (no top-k/top-p); null: on CUDA
    fuse_projections: bool | None = None  # q/k/v and gate/up as one matrix product each; null: on CUDA
    # norms, residual adds, SiLU x up and a prefill's RoPE as Triton kernels in eager forwards; null: on CUDA
    elementwise_kernels: bool | None = None

    def __post_init__(self) -> None:
        if self.kv_block_size < 1 or self.max_slots < 1 or self.decode_split_tokens < 1:
            raise ValueError("engine.kv_block_size, engine.max_slots and engine.decode_split_tokens must be >= 1")
        if not 0 < self.expected_length_fraction <= 1:
            raise ValueError(f"engine.expected_length_fraction must be in (0, 1], got {self.expected_length_fraction}")


@dataclass
class PackedAttentionConfig:
    kernel: PackedAttentionKernel = PackedAttentionKernel.auto  # packed attention on CUDA (auto: per pack)
    # "auto" takes cudnn for a pack whose documents come in at most this many distinct lengths, none shorter
    # than cudnn_min_length (equal-length sequences, say). One length needs no permutation of the pack and adds
    # one compiled variant of the layers; each further count of length groups would add another.
    cudnn_max_lengths: int = 1
    cudnn_min_length: int = 512  # see cudnn_max_lengths
    # repeat the key/value heads to the query heads before cuDNN (for a cuDNN build that rejects grouped-query
    # shapes)
    cudnn_repeat_kv: bool = False


@dataclass
class LearnerConfig:
    """How the learner computes (its kernels and modes); what it optimises is PPOConfig."""

    packed_attention: PackedAttentionConfig = field(default_factory=PackedAttentionConfig)
    one_rank_mode: OneRankMode = OneRankMode.plain  # how a single learner rank runs (no FSDP in plain)
    # With the fused (CUDA) AdamW of the plain one-rank path, the clipping factor goes into the optimizer kernel
    # (as its grad_scale divisor) instead of a pass of its own over the gradients.
    fused_clip: bool = True
    # A one-rank group reduces nothing, and an update reads its stats and gradient norm once, after the
    # optimizer step is queued; false: collectives on one rank too and the stats read before the optimizer
    # step (the training benchmark's ablation).
    defer_reads: bool = True
    # Low-precision logits of up to this many GiB per LM-head call are kept from forward for backward instead
    # of formed again (16,384 rows x 151,936 x 2 bytes = 4.6 GiB); 0 always forms them again. fp32 logits
    # are never kept.
    keep_logits_gib: float = 6.0


@dataclass
class GenerationConfig:
    group_size: int = 8  # samples per prompt (G)
    max_new_tokens: int = 16  # the most tokens one answer (one model turn) may have
    temperature: float = 1.0  # sampling temperature of training rollouts (<= 0: greedy)
    top_p: float = 1.0  # nucleus truncation (1: none; behaviour logprobs are taken before it)
    top_k: int = 0  # top-k truncation (0: none)
    # Benchmarks with random weights (which never sample the stop token): each request's token limit is drawn
    # log-normal (sigma 1) with this mean, clipped to [16, max_new_tokens], seeded by its group and sample index.
    # null: every request may use max_new_tokens.
    simulated_length_mean: float | None = None

    def __post_init__(self) -> None:
        _at_least("generation", group_size=(self.group_size, 1), max_new_tokens=(self.max_new_tokens, 1))
        if not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(f"generation.top_p must be in (0, 1] and generation.top_k >= 0, got {self.top_p}, "
                             f"{self.top_k}")


# The choices graders make differently (reward.conventions). The defaults follow math-verify where it and
# Qwen2.5-Math's grader disagree on a convention, except percentages and the tolerance on numbers, which follow
# Qwen2.5-Math (AReaL's protocol).
@dataclass
class Conventions:
    # "[5,\infty)" equals "x \ge 5", and "(1,3]" equals "1 < x \le 3" (math-verify); false: an interval and an
    # inequality are different answers (Qwen2.5-Math)
    interval_equals_inequality: bool = True
    # "10\%" also equals 0.1 and 1000 (Qwen2.5-Math's include_percentage); false: only 10 (math-verify)
    percent_variants: bool = True
    # two numbers that are not both integers are equal within this relative tolerance (Qwen2.5-Math: 1e-4;
    # math-verify rounds to 6 digits); two integers must be equal
    relative_tolerance: float = 1e-4
    # "32, 349" (a comma and a space between digits) is the number 32349; false: a list of two numbers (math-verify).
    # A comma without a space between groups of three digits ("10,455") is always a thousands separator.
    spaced_thousands: bool = False


@dataclass
class RewardConfig:
    kind: RewardKind = RewardKind.math  # code: each prompt's tests run in the code sandbox (reward/code_verifier.py)
    partial_credit: bool = False  # code: the reward moves from incorrect to correct with the share of tests passed
    correct_reward: float = 5.0  # reward of a correct answer (AReaL v0.1: +5)
    incorrect_reward: float = -5.0  # reward of a wrong answer (AReaL v0.1: -5)
    timeout_s: float = 5.0  # seconds a judgement (or a sandboxed program) may take
    memory_limit_mb: int = 1024  # memory of each verifier worker or sandboxed program
    num_workers: int = 2  # verifier worker processes (code: concurrent sandboxed programs)
    extract_mode: ExtractMode = ExtractMode.auto  # where the answer is read from a response
    conventions: Conventions = field(default_factory=Conventions)  # where graders differ (reward/conventions.py)


@dataclass
class PPOConfig:
    objective: Objective = Objective.decoupled  # decoupled PPO (proximal policy, behaviour weights) or naive PPO
    lr: float = 1e-4  # AdamW learning rate
    lr_warmup_steps: int = 0  # optimizer updates of linear warm-up from 0 to lr
    weight_decay: float = 0.0  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1
    adam_beta2: float = 0.999  # AdamW beta2
    grad_clip: float = 1.0  # gradient norm clip per optimizer update
    eps_clip: float = 0.2  # PPO clip range of the ratio to the proximal policy
    behaviour_weight_cap: float | None = None  # cap on the behaviour importance weight (null: none)
    behaviour_weight_mode: BehaviourWeightMode = BehaviourWeightMode.clip  # what a weight above the cap does
    kl_coef: float = 0.0  # against the initial policy; > 0 keeps a frozen reference copy
    kl_mode: KLMode = KLMode.loss  # the KL term in the loss, or in the reward
    advantage_norm: AdvantageNorm = AdvantageNorm.group  # advantages: reward minus the group mean, and so on
    # optimizer updates per training step (AReaL v0.1: ppo_n_minibatches=4). With 1, the only update runs at the
    # proximal weights, where the ratio is 1 and eps_clip cannot act (the run warns).
    minibatches_per_step: int = 4
    activation_checkpointing: bool = False  # recompute each decoder layer in backward (learner ranks)
    micro_batch_tokens: int = 16384  # token budget per forward/backward (gradient is budget-invariant)
    filter_zero_variance_groups: bool = True  # drop groups whose samples all got the same reward
    compile_layers: bool | None = None  # torch.compile each decoder layer of the trained policy; null: on CUDA

    def __post_init__(self) -> None:
        _at_least("ppo", minibatches_per_step=(self.minibatches_per_step, 1),
                  micro_batch_tokens=(self.micro_batch_tokens, 1), lr_warmup_steps=(self.lr_warmup_steps, 0))
        for name in ("lr", "weight_decay", "kl_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"ppo.{name} must be >= 0, got {getattr(self, name)}")
        if self.eps_clip <= 0 or self.grad_clip <= 0:
            raise ValueError(f"ppo.eps_clip and ppo.grad_clip must be > 0, got {self.eps_clip}, {self.grad_clip}")
        # a cap below 1 cuts the weight of tokens the current weights sampled (w = 1); in mask mode it drops them
        if self.behaviour_weight_cap is not None and self.behaviour_weight_cap < 1:
            raise ValueError(f"ppo.behaviour_weight_cap must be >= 1 or null, got {self.behaviour_weight_cap}")


class ChatTemplateKind(enum.Enum):
    prompt_type = "prompt_type"  # the role template of data.prompt_type (boxed when unset): areal_async/agents/chat.py
    tokenizer = "tokenizer"  # the tokenizer's own Jinja chat_template


class ToolName(enum.Enum):
    calculator = "calculator"  # exact arithmetic with sympy (no code runs)
    python = "python"  # a script in the code sandbox, under reward.sandbox's limits


@dataclass
class AgentConfig:
    """Multi-turn workflows' settings (rollout.workflow); single-turn math uses none of them."""

    tools: list[ToolName] = field(default_factory=list)  # the tools a workflow's context offers
    chat_template: ChatTemplateKind = ChatTemplateKind.prompt_type  # how chats are rendered to tokens
    max_turns: int = 8  # model turns per episode
    max_tool_calls: int = 8  # tool calls per episode
    max_total_tokens: int | None = None  # the conversation's tokens; null: only generation.max_new_tokens a turn
    max_wall_s: float = 600.0  # seconds per episode
    max_attempts: int = 3  # MultiTurnRetry: answers per episode
    # MultiTurnRetry: the k-th answer's reward counts discount^(k-1); rewards per completion are discounted alike
    discount: float = 0.9
    # an OpenAI-compatible endpoint per episode (client.base_url) for agents in other processes
    serve_http: bool = False
    http_host: str = "127.0.0.1"  # the address the endpoint listens on
    http_port: int = 0  # 0: any free port, a new one each round

    def __post_init__(self) -> None:
        _at_least("rollout.agent", max_turns=(self.max_turns, 1), max_tool_calls=(self.max_tool_calls, 0),
                  max_attempts=(self.max_attempts, 1))
        if not 0.0 < self.discount <= 1.0:
            raise ValueError(f"rollout.agent.discount must be in (0, 1], got {self.discount}")


@dataclass
class RolloutConfig:
    groups_per_step: int = 32  # prompts per training step
    max_staleness: int | None = 0  # 0 = synchronous; null = unbounded
    groups_per_request: int = 32  # groups a rollout worker generates in one batch
    # admission counts a group in flight as the recent fraction of groups kept on arrival, down to
    # 1 / max_oversample of a slot: when zero-variance filtering drops most groups, an inline round generates up to
    # max_oversample x groups_per_request of them (what the queue has room for) instead of a round per remainder.
    # 1 (off): every admitted group takes a whole slot
    max_oversample: float = 1.0
    queue_capacity_per_shard: int = 256  # groups; a full shard makes workers wait (backpressure)
    num_queue_shards: int = 1  # replay-queue shards (Ray actors under cluster.placement=ray)
    log_trajectories: bool = True  # zarr log of every consumed trajectory in the run folder
    engine: EngineKind = EngineKind.torch  # the rollout workers' engine (vllm: cluster.placement=ray only)
    # the agent workflow by import path, "package.module:Class" (areal_async/agents/workflows.py says what one is)
    workflow: str = "areal_async.agents.workflows:SingleTurnMath"
    agent: AgentConfig = field(default_factory=AgentConfig)

    def __post_init__(self) -> None:
        _at_least("rollout", groups_per_step=(self.groups_per_step, 1),
                  groups_per_request=(self.groups_per_request, 1),
                  queue_capacity_per_shard=(self.queue_capacity_per_shard, 1),
                  num_queue_shards=(self.num_queue_shards, 1))
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"rollout.max_staleness must be >= 0 or null, got {self.max_staleness}")
        if self.max_oversample < 1:
            raise ValueError(f"rollout.max_oversample must be >= 1, got {self.max_oversample}")


class Placement(enum.Enum):
    inline = "inline"  # one process: the driver alternates generation and training (deterministic)
    ray = "ray"  # controller, queue shards and rollout workers as Ray actors, generating concurrently


@dataclass
class ClusterConfig:
    placement: Placement = Placement.inline  # one process, or Ray actors
    address: str | None = None  # Ray: null starts a local instance; "auto" or host:port joins a cluster
    num_learner_ranks: int = 1  # FSDP ranks (Ray actors) training the policy together
    cpus_per_learner_rank: float = 1.0  # Ray CPUs per learner rank
    gpus_per_learner_rank: float = 0.0  # 1 on GPU nodes; the learner uses `device` (cuda = its Ray GPU)
    num_rollout_workers: int = 1  # rollout workers (Ray actors)
    cpus_per_rollout_worker: float = 1.0  # Ray CPUs per rollout worker
    gpus_per_rollout_worker: float = 0.0  # Ray GPUs per rollout worker
    rollout_device: str = "cpu"  # the rollout workers' device
    torch_threads_per_worker: int = 1  # torch threads in each rollout worker
    # A dead rollout worker is replaced; this many deaths within worker_restart_window_s stop the run.
    max_worker_restarts: int = 3
    worker_restart_window_s: float = 600.0  # see max_worker_restarts
    # Weight-sync operations fail after this long (a member that never answers); gloo fails at once on a dead one.
    sync_timeout_s: float = 300.0
    # The machines, for `areal-async plan` (areal_async/planning/placement.py): `nodes` nodes of `gpus_per_node` GPUs with
    # `gpu_memory_gib` each (an 80 GB H100 reports 79.2 GiB). Every node gets the same share of the learner
    # ranks and rollout workers. Ray itself places the actors by their resources.
    nodes: int = 1
    gpus_per_node: int = 8  # GPUs per node (plan and placement)
    gpu_memory_gib: float = 80.0  # memory of each GPU (plan)


@dataclass
class EvalConfig:
    num_samples: int = 4  # samples per held-out problem (averaged pass@1)
    temperature: float = 1.0  # sampling temperature of held-out evaluation
    every_steps: int = 0  # 0 = only before and after training
    # Benchmarks evaluated every benchmark_every_steps steps with the same samples and temperature, named as
    # for `areal-async eval --benchmarks` and quoted for hydra: eval.benchmarks="['gsm8k,limit=20']". Logged to
    # metrics.jsonl and wandb as eval/<benchmark>/pass@1; every sample is kept under <run>/eval/step<N>/.
    benchmarks: list[str] = field(default_factory=list)
    benchmark_every_steps: int = 0  # benchmark evaluation every N steps (0: never)
    data_dir: str | None = None  # benchmark files (default: $AREAL_EVAL_DATA or ../shared/data/eval)
    prompt_type: PromptType = PromptType.boxed  # the prompt format of benchmark evaluation
    max_gen_tokens: int | None = None  # default: generation.max_new_tokens


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.disabled  # wandb logging: disabled, offline or online
    project: str = "areal-async"  # the wandb project


@dataclass
class TrainConfig:
    run_name: str | None = None  # default: a timestamp
    output_dir: str = "outputs"  # where run folders are made
    total_steps: int = 60  # training steps (each makes one policy version)
    seed: int = 1  # the run's seed (data order, sampling, initialisation)
    device: str = "cpu"  # cpu or cuda
    save_every: int = 0  # HF checkpoint every N steps (0 = only the final one)
    checkpoint_every: int = 10  # resumable run checkpoint every N steps (0 = none)
    keep_checkpoints: int = 2  # run checkpoints kept (older ones are deleted)
    resume: bool = False  # continue run_name from its latest run checkpoint
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TinyModelShape:
    hidden_size: int = 128  # the tiny model's width
    intermediate_size: int = 384  # its MLP width
    num_hidden_layers: int = 4  # its layers
    num_attention_heads: int = 4  # its query heads
    num_key_value_heads: int = 2  # its key/value heads


@dataclass
class SFTConfig:
    """Supervised warm start for the synthetic task: a tiny model trained from scratch on noisy demonstrations."""

    output: str | None = None  # default: the bundled warm-start folder
    task: SFTTask = SFTTask.arithmetic  # code_table: data/synthetic_code.py's completions (configs/sft_code_cpu.yaml)
    steps: int = 1500  # optimizer steps
    batch_size: int = 256  # demonstrations per step (128 trains a much weaker warm start: benchmarks/NOTES.md)
    lr: float = 3e-3  # AdamW learning rate (warm-up, then cosine decay to a tenth)
    warmup_steps: int = 100  # steps of linear learning-rate warm-up
    error_rate: float = 0.4  # share of demonstrations with a near-miss answer (code_table: a slope or offset off by one)
    tool_rate: float = 0.3  # tool_products: share of demonstrations that call the calculator (the rest guess)
    worked_steps: bool = False  # demonstrations show running totals before the answer (operators '+-' only)
    device: str = "cpu"  # cpu or cuda
    seed: int = 0  # the seed of data and initialisation
    deterministic: bool = True  # deterministic kernels (torch.use_deterministic_algorithms): one seed, one warm start on a GPU
    shape: TinyModelShape = field(default_factory=TinyModelShape)
    arithmetic: ArithmeticConfig = field(default_factory=ArithmeticConfig)


@dataclass
class AblationConfig:
    """A staleness ablation grid (configs/ablation/*.yaml, run by `areal-async ablate`): every max_staleness x
    objective x seed is one training run of the train config `base_config` with `overrides`."""

    base_config: str = "async_cpu"  # a train config in configs/
    overrides: list[str] = field(default_factory=list)  # hydra overrides of every run (key=value)
    max_staleness: list[int | None] = field(default_factory=lambda: [0, 4])  # null = unbounded
    objectives: list[Objective] = field(default_factory=lambda: [Objective.decoupled, Objective.naive])
    seeds: list[int] = field(default_factory=lambda: [1])  # the train config's `seed`
    steps: int | None = None  # total_steps of every run; null: the base config's

    def __post_init__(self) -> None:
        for name in ("max_staleness", "objectives", "seeds"):
            values = getattr(self, name)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"ablation {name} must be a non-empty list without repeats, got {list(values)}")
        if any(eta is not None and eta < 0 for eta in self.max_staleness):
            raise ValueError(f"ablation max_staleness values must be >= 0 or null, got {list(self.max_staleness)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"ablation steps must be at least 1, got {self.steps}")


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore  # only the CLI needs hydra (GPU images may lack it)

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    store.store(name="sft_schema", node=SFTConfig)
    store.store(name="ablation_schema", node=AblationConfig)


def apply_overrides(config, overrides: list[str]) -> None:
    """Sets `key.sub=value` overrides on a config dataclass in place, for scripts without hydra (the
    benchmarks on GPU images): values are parsed by the field's current type (an enum by its value, a bool
    from true/false, int, float, str; null for None). An unknown key or a bad value is an error naming it."""
    for override in overrides:
        key, sep, text = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r}: expected key=value")
        *parents, name = key.split(".")
        target = config
        for part in parents:
            target = getattr(target, part, None) if part in getattr(target, "__dataclass_fields__", {}) else None
            if target is None:
                raise ValueError(f"override {override!r}: unknown key {key!r}")
        if name not in getattr(target, "__dataclass_fields__", {}):
            raise ValueError(f"override {override!r}: unknown key {key!r}")
        current = getattr(target, name)
        try:
            if text == "null":
                value = None
            elif isinstance(current, enum.Enum):
                value = type(current)(text)
            elif isinstance(current, bool):
                value = {"true": True, "false": False}[text.lower()]
            elif isinstance(current, (int, float)):
                value = type(current)(text)
            else:
                value = text
        except (KeyError, ValueError) as error:
            raise ValueError(f"override {override!r}: bad value for {key!r} ({error})") from None
        setattr(target, name, value)
