"""megafusion.parallel"""
