"""The math-head workbench: data, synthetic problems, metrics, training, evaluation, base models and the demo.

Built on the method (`peft_backattn`), never imported by it. Import the module you need, e.g.
`from peft_backattn.workbench.training import train_head`.
"""
