"""The bundled example agent (plan -> search -> charge_card -> summarize) and the demo.

Needs no LLM and no network: the steps think by sleeping and charge a card by writing a row
to a ledger, so that a run can prove each card was charged exactly once.
"""
