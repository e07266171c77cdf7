"""Membership attacks on the global model, one module each, registered in
:data:`fedsim.privacy.attacks.base.MIA_ATTACKS` (``privacy.mia.attacks`` names them):
:mod:`~fedsim.privacy.attacks.loss` (Yeom et al. 2018), :mod:`~fedsim.privacy.attacks.lira`
(Carlini et al. 2022), :mod:`~fedsim.privacy.attacks.rmia` (Zarifzadeh et al. 2024).

The registry never imports the attacks: they register when :mod:`fedsim.plugins` (or
:mod:`fedsim.privacy`, which exports their score functions) imports them.
"""
