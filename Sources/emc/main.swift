print("emc")
