from vlmguard.cli import main

main()
