"""The CPU worlds beside the 2-D toy (toy_flow.py, at the top): the 8×8 handwritten digits with
learned rewards (digits_flow.py, `python -m worlds.digits_flow`), and what every CPU world's
studies share (studies.py: fine-tuning with evaluations, samplers, 95 % intervals and paired
differences, flags generated from g2rpo.Config).
"""
