"""r1lab: the DeepSeek-R1 system, open and cheap.

A DeepSeek-V3-style model (MLA, DeepSeekMoE, multi-token prediction) pretrained into a base model,
turned into a reasoner with GRPO on rule-based rewards, evaluated with the R1 report's protocol and
served over the OpenAI chat API with `reasoning_content`.
"""

__version__ = "0.1.0"
