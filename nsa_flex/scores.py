"""score_mod generators (softcap, ALiBi, relative bias) and their composition."""
