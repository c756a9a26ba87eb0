"""Alerts: which incidents go where (plan), what they say (payload), and the destination
plug-ins (registry) the notifier process delivers them through."""
