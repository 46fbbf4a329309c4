"""The recurrent network, its fast sampling stepper, and the one definition of its score
(loss, perplexity, bits per character)."""
