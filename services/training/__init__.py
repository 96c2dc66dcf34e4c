"""Training: the coordinator and its run loop, experience (rollout + rewards), the learner (Ray
Train), the RL methods' plug-ins, evaluation, guards, prompt sets and run logging."""
