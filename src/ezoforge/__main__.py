from ezoforge.cli import main

main()
